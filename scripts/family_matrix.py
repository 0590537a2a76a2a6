"""Print the families x exporter forms table: what was rewritten and the equivalence figure.

Builds each tiny family model, exports it through TorchScript (opset 17, 14) and dynamo,
runs the default pipeline and reports the worst centred-logit difference relative to the
logit scale. Usage: python scripts/family_matrix.py [family ...]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from lensgraph import tiny_models
from lensgraph.errors import LensError
from lensgraph.export import export_model
from lensgraph.process import process

FORMS = {"torchscript17": dict(exporter="torchscript", opset=17),
         "torchscript14": dict(exporter="torchscript", opset=14),
         "dynamo": dict(exporter="dynamo")}


def main(families: list[str]) -> None:
    print("| family | form | fold_ln | centred writers | centre unembed | value folds | equivalence | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for family in families:
            model = tiny_models.build(family, seed=7)
            for form, kwargs in FORMS.items():
                src, out = os.path.join(folder, f"{family}-{form}.onnx"), os.path.join(folder, "out.onnx")
                try:
                    export_model(model, src, **kwargs)
                    start = time.perf_counter()
                    report = process(src, out)
                    seconds = time.perf_counter() - start
                except LensError as exc:
                    print(f"| {family} | {form} | error: {exc} |||||")
                    continue
                counts = {p["name"]: p for p in report["passes"]}
                cell = lambda name: (f"{counts[name]['rewritten']}/{counts[name]['matched']}"  # noqa: E731
                                     if not counts[name]["skipped"] or counts[name]["rewritten"] else "skipped")
                v = report["verification"]
                figure = f"{v['max_rel_diff']:.1e}" if v else "unchanged"
                print(f"| {family} | {form} | {cell('fold_ln')} | {cell('center_writing_weights')} | "
                      f"{cell('center_unembed')} | {cell('fold_value_biases')} | {figure} | {seconds:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:] or tiny_models.FAMILIES)
