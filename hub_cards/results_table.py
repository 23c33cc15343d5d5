"""The README's results table, rendered from the shipped folders' `eval/*/metrics.json`.

One row per classifier folder under models/ (folders without evaluations are skipped), one column
group per evaluation set: melanoma AUC with its 95% CI ("at chance" when the CI includes 0.5) and
sensitivity / specificity at the validation threshold; balanced accuracy for HAM10000. The README
holds the table between two markers, and tests/test_shipped_models.py checks it is current:

    python -m hub_cards.results_table models            # print the table
    python -m hub_cards.results_table models --write README.md
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .render import KNOWN_DATASETS, auc_text, fmt_number, is_number, load_eval_sets

START = "<!-- results-table:start (python -m hub_cards.results_table models --write README.md) -->"
END = "<!-- results-table:end -->"
#: Evaluation folders shown, in this order.
SETS: tuple[str, ...] = ("ham10000_test", "isic2017_test", "derm7pt_test")


def results_table(models_dir: Path, sets: tuple[str, ...] = SETS) -> str:
    """The markdown table (rows in folder-name order)."""
    header = ["Model"]
    for key in sets:
        name = KNOWN_DATASETS.get(key.rsplit("_", 1)[0], (key,))[0]
        header += [f"{name}: melanoma AUC (95% CI)", "sens. / spec."]
        if key.startswith("ham10000"):
            header.append("balanced acc.")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for folder in sorted(p for p in Path(models_dir).iterdir() if (p / "eval").is_dir()):
        evals = {es.key: es.metrics for es in load_eval_sets(folder)}
        cells = [f"`{folder.name}`"]
        for key in sets:
            m = evals.get(key, {})
            cells.append(auc_text(m["melanoma_auc"], m.get("melanoma_auc_ci95")) if is_number(m.get("melanoma_auc")) else "-")
            sens, spec = m.get("sensitivity_val95"), m.get("specificity_val95")
            cells.append(f"{fmt_number(sens)} / {fmt_number(spec)}" if is_number(sens) and is_number(spec) else "-")
            if key.startswith("ham10000"):
                cells.append(fmt_number(m["balanced_accuracy"]) if is_number(m.get("balanced_accuracy")) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(text: str, table: str) -> str:
    """`text` with the block between the markers replaced by `table`; ValueError without markers."""
    pattern = re.compile(re.escape(START) + r"\n.*?\n" + re.escape(END), flags=re.S)
    if not pattern.search(text):
        raise ValueError(f"no results-table markers ({START} ... {END}) in the file")
    return pattern.sub(lambda _: f"{START}\n{table}\n{END}", text, count=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the README's results table from models/*/eval.")
    parser.add_argument("models_dir", type=Path)
    parser.add_argument("--write", type=Path, help="replace the table between the markers in this file")
    args = parser.parse_args(argv)
    table = results_table(args.models_dir)
    if args.write is None:
        print(table)
        return 0
    try:
        args.write.write_text(replace_block(args.write.read_text(encoding="utf-8"), table), encoding="utf-8")
    except ValueError as err:
        print(f"error: {args.write}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
