"""`tunelab data inspect`: what a data file becomes before any training is spent on it."""

from dataclasses import replace

from tunelab.config.schema import DataConfig
from tunelab.data.encode import IGNORE, Encoded
from tunelab.data.prepare import prepare_data, report_warnings


def inspect_data(path: str, model: str = "smollm2-135m-instruct", format: str = "auto",
                 columns: dict | None = None, max_seq_len: int = 1024, train_on_prompt: bool = False,
                 system_prompt: str | None = None, chat_template: str | None = None, val_fraction: float = 0.0,
                 seed: int = 42) -> dict:
    """Read, convert, check and tokenize a data file with a model's tokenizer; return the report.

    The report has the detected format, counts, token length percentiles, truncations,
    duplicates, and `example`: the first example's rendered text with its trained tokens marked.
    """
    from tunelab.models.load import load_tokenizer, local_folder
    from tunelab.models.resolve import resolve_model

    tok = load_tokenizer(local_folder(resolve_model(model)), chat_template)
    cfg = replace(DataConfig(), train=path, format=format, columns=columns or {}, max_seq_len=max_seq_len,
                  train_on_prompt=train_on_prompt, system_prompt=system_prompt, val_fraction=val_fraction)
    data = prepare_data(cfg, tok, seed, progress=True)
    report = dict(data.report)
    report["model"] = model
    report["warnings"] = report_warnings(report)
    if data.train:
        report["example"] = {"source": data.train[0].source, "segments": marked_segments(data.train[0], tok)}
    return report


def marked_segments(e: Encoded, tokenizer) -> list[tuple[str, bool]]:
    """The example's text as (piece, trained?) runs, for display."""
    runs: list[tuple[list[int], bool]] = []
    for tok_id, label in zip(e.input_ids, e.labels):
        trained = label != IGNORE
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(tok_id)
        else:
            runs.append(([tok_id], trained))
    return [(tokenizer.decode(ids), trained) for ids, trained in runs]


def print_inspection(report: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    from tunelab.log import console

    tr = report["train"]
    console.print(f"[bold]{report['train_file']}[/]: {report['rows']} rows, format [bold]{report['format']}[/], "
                  f"model {report['model']}")
    t = Table(show_header=True, header_style="bold")
    for col in ("examples", "tokens", "answer tokens", "truncated", "no answer left", "duplicates"):
        t.add_column(col, justify="right")
    t.add_row(str(tr["examples"]), str(tr["tokens"]), str(tr["target_tokens"]),
              f"{tr['truncated']} (max_seq_len {report['max_seq_len']})", str(tr["dropped_no_target"]),
              str(report["duplicates"]))
    console.print(t)
    lengths = report["train_token_lengths"]
    if lengths:
        console.print("tokens per example: " + ", ".join(f"{k} {v}" for k, v in lengths.items()))
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    if "example" in report:
        console.print(f"\nfirst example ({report['example']['source']}), trained tokens in [bold green]green[/] "
                      "between ⟦ ⟧:")
        text = Text()
        for piece, trained in report["example"]["segments"]:
            text.append(f"⟦{piece}⟧" if trained else piece, style="bold green" if trained else "dim")
        console.print(text)
