"""Training stages beyond SFT: pretraining (our own loop) and the TRL-backed preference / RL stages."""
