// promql-check parses PromQL with the Prometheus parser itself, so the chart's alert rules and dashboard queries are
// checked by the same code Prometheus runs, not by a regular expression.
//
// stdin:  a JSON list of {"name": str, "expr": str, "for": str (optional)}
// stdout: one JSON object per item, in order: {"name": str, "ok": bool, "error": str}
// exit:   0 when every item parses, 1 when any does not, 2 when the input is not such a list.
//
// Only the parser is linked (not the query engine, rulefmt or the template packages): a small, quick build.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/promql/parser"
)

type item struct {
	Name string  `json:"name"`
	Expr string  `json:"expr"`
	For  *string `json:"for,omitempty"`
}

type result struct {
	Name  string `json:"name"`
	OK    bool   `json:"ok"`
	Error string `json:"error"`
}

// promql is the parser a default Prometheus uses: no feature flags, so experimental functions and modifiers are errors.
var promql = parser.NewParser(parser.Options{})

func check(it item) result {
	if _, err := promql.ParseExpr(it.Expr); err != nil {
		return result{Name: it.Name, Error: "expr: " + err.Error()}
	}
	if it.For != nil && *it.For != "" {
		if _, err := model.ParseDuration(*it.For); err != nil {
			return result{Name: it.Name, Error: "for: " + err.Error()}
		}
	}
	return result{Name: it.Name, OK: true}
}

func main() {
	var items []item
	dec := json.NewDecoder(os.Stdin)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&items); err != nil {
		fmt.Fprintf(os.Stderr, "promql-check: stdin must be a JSON list of {name, expr, for}: %v\n", err)
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	failed := false
	for _, it := range items {
		r := check(it)
		failed = failed || !r.OK
		if err := out.Encode(r); err != nil {
			fmt.Fprintf(os.Stderr, "promql-check: %v\n", err)
			os.Exit(2)
		}
	}
	if failed {
		os.Exit(1)
	}
}
