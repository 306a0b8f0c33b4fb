// gorender renders Ollama-style chat templates with Go's real text/template, filling the data the
// way Ollama's server does (server: a Modelfile SYSTEM is prepended when the conversation has no
// system message; template.Execute: collate() merges consecutive same-role messages with "\n\n",
// joins all system messages into .System, keeps them in .Messages, and executes with
// missingkey=zero and the "json" func). Only the .Messages code path is mimicked: tunelab emits
// .Messages templates. Test helper for tests/test_ollama.py, not part of tunelab.
//
// stdin: JSON list of {"template": str, "messages": [{"role","content"}], "system": str}
// stdout: JSON list of {"text": str} or {"error": str}, one per case.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	System   string    `json:"system"` // the Modelfile's SYSTEM, "" if none
}

type Result struct {
	Text  *string `json:"text,omitempty"`
	Error string  `json:"error,omitempty"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func render(c Case) (string, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return "", err
	}
	msgs := c.Messages
	if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: c.System}}, msgs...)
	}
	system, collated := collate(msgs)
	var b bytes.Buffer
	err = tmpl.Execute(&b, map[string]any{
		"System":   system,
		"Messages": collated,
		"Tools":    nil,
		"Response": "",
	})
	return b.String(), err
}

func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		fmt.Fprintln(os.Stderr, "gorender: bad input:", err)
		os.Exit(2)
	}
	out := make([]Result, len(cases))
	for i, c := range cases {
		text, err := render(c)
		if err != nil {
			out[i] = Result{Error: err.Error()}
		} else {
			out[i] = Result{Text: &text}
		}
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		os.Exit(1)
	}
}
