#!/usr/bin/env python3
"""Real Helm, offline, through PyPI's helm-python-sdk (Helm's Go engine as a library).

  helm.py lint CHART [-f VALUES]...            strict lint; exit 1 on any finding
  helm.py render CHART [-f VALUES]... [--set K=V]... [--namespace NS] [--name NAME] [--out DIR]
      prints the rendered objects as one JSON array (one object per manifest document);
      with --out, also writes each template's manifest as YAML under DIR for validators
  helm.py schema CHART [-f VALUES]...          validate values against values.schema.json
  helm.py values CHART                         the chart's default values as JSON
"""

import argparse
import json
import os
import sys

import helm_python as helm
import yaml


def load_values(files, sets):
    values = {}
    for f in files or []:
        with open(f) as fh:
            merge(values, yaml.safe_load(fh) or {})
    for s in sets or []:
        merge(values, helm.parse_set_string(s))
    return values


def merge(into, new):
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            merge(into[k], v)
        else:
            into[k] = v


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["lint", "render", "schema", "values"])
    p.add_argument("chart")
    p.add_argument("-f", "--values", action="append")
    p.add_argument("--set", action="append")
    p.add_argument("--namespace", default="greenthread-system")
    p.add_argument("--name", default="greenthread")
    p.add_argument("--out")
    a = p.parse_args()
    values = load_values(a.values, a.set)

    if a.command == "lint":
        report = helm.lint(a.chart, values, strict=True, namespace=a.namespace)
        findings = [m for m in report.get("messages") or [] if m.get("severity", 0) >= 2]
        errors = report.get("errors") or []
        for m in findings:
            print(f"{m.get('path')}: {m.get('error')}", file=sys.stderr)
        for e in errors:
            print(e, file=sys.stderr)
        print(json.dumps(report))
        return 1 if findings or errors else 0

    chart = helm.Chart.load(a.chart)
    if a.command == "values":
        print(json.dumps(chart.values))
        return 0
    if a.command == "schema":
        try:
            chart.validate_schema(values)
        except helm.HelmError as e:
            print(str(e), file=sys.stderr)
            return 1
        return 0

    chart.validate_schema(values)
    manifests = chart.render(values, name=a.name, namespace=a.namespace, is_install=True)
    objects = []
    for path in sorted(manifests):
        text = manifests[path]
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        docs = [d for d in yaml.safe_load_all(text) if d]
        objects.extend(docs)
        if a.out and docs:
            os.makedirs(a.out, exist_ok=True)
            name = path.replace("/", "_")
            with open(os.path.join(a.out, name), "w") as fh:
                fh.write(text)
    print(json.dumps(objects))
    return 0


if __name__ == "__main__":
    sys.exit(main())
