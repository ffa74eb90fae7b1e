"""The judge against the eye: agreement on the labelled check set of model outputs, old judge and new side by side.

    python bench/judge_agreement.py [--set bench/results/judge_check_set] [--out bench/results/judge_agreement]
    python bench/judge_agreement.py --fit     # fit the thresholds on the even-numbered half, print them

The check set and both judges' verdicts are described in :mod:`microworld.check_set`. Writes JSON and a Markdown
table with the confusion tables of both.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from microworld.check_set import (CLASSES, agreement, consensus, eye_against_eye, load_second_pass,  # noqa: E402
                                  load_set, verdicts)


def table(result: dict) -> str:
    old, new = result["old"], result["new"]
    lines = ["# The judge against the eye (check set of model outputs)", "",
             f"{old['n']} objects cut from generations of the base model, LoRAs, SaRA and LoRA-Composer, labelled by "
             f"eye ([contact sheets](judge_check_set/)). Old judge: the CNN's shape label alone. New judge: "
             f"the shape that fits the object's mask best (fidelity: best IoU with the generator's rendering of it, "
             f"a triangle's corners free, a square's corners maybe rounded, a ring a round loop round a real hole), "
             f"if it reaches its threshold, no part strays further than the shape's deviation limit and a convex "
             f"shape is solid enough, else `malformed` (or `empty`); the CNN plays no part. Thresholds "
             f"{result['thresholds']}, preferences {result['preference']}, deviation limits {result['deviations']} "
             f"and least solidity {result['min_solidity']} were fitted on the even-numbered half of the first "
             f"labelling (`--fit`), each within the generator's own objects' range; the odd half is held out.",
             "", f"Every disagreement with the eye on one sheet: [{result['disagreements']['sheet']}]"
                 f"({result['disagreements']['sheet']}) ({result['disagreements']['count']} objects).",
             "", "| measure | old judge | new judge |", "|---|---:|---:|",
             f"| shape verdict agrees with the eye | {old['agreement']:.1%} | {new['agreement']:.1%} |",
             f"| … on the held-out half ({result['new_held_out']['n']} objects) | "
             f"{result['old_held_out']['agreement']:.1%} | {result['new_held_out']['agreement']:.1%} |",
             "| objects the eye calls malformed given a shape | "
             f"{_pct(old['malformed_given_a_shape'])} | {_pct(new['malformed_given_a_shape'])} |",
             f"| colour agrees (objects with a shape) | {old['colour_agreement_on_shapes']:.1%} | "
             f"{new['colour_agreement_on_shapes']:.1%} |"]
    second = result.get("second_pass")
    if second:
        eye = second["eye_against_eye"]
        lines[-2:-2] = [
            f"| … against a second, blind labelling by the same eye | {second['old']['agreement']:.1%} | "
            f"{second['new']['agreement']:.1%} |",
            f"| … on the {second['new_consensus']['n']} objects both labellings agree on | "
            f"{second['old_consensus']['agreement']:.1%} | {second['new_consensus']['agreement']:.1%} |",
            "| … of these, objects the eye calls malformed given a shape | "
            f"{_pct(second['old_consensus']['malformed_given_a_shape'])} | "
            f"{_pct(second['new_consensus']['malformed_given_a_shape'])} |",
            f"| … on the held-out half of them ({second['new_consensus_held_out']['n']} objects) | "
            f"{second['old_consensus_held_out']['agreement']:.1%} | {second['new_consensus_held_out']['agreement']:.1%} |",
            "| … of these, objects the eye calls malformed given a shape | "
            f"{_pct(second['old_consensus_held_out']['malformed_given_a_shape'])} | "
            f"{_pct(second['new_consensus_held_out']['malformed_given_a_shape'])} |"]
        lines += ["", f"**The eye against itself:** a second labelling of the same {eye['n']} objects by the same "
                      f"person, blind (new order and names, [sheets](judge_check_set/second_pass/), no first labels "
                      f"or verdicts in view), agrees with the first on {eye['agreement']:.1%}. Where they differ "
                      "(first → second): " + ", ".join(f"{k.replace('->', ' → ')} {n}" for k, n in
                                                       sorted(eye["confusion"].items(), key=lambda kv: -kv[1])
                                                       if k.split("->")[0] != k.split("->")[1]) + "."]
    lines += ["", "Agreement per class the eye gave:", "", "| eye says | n | old judge | new judge |", "|---|---:|---:|---:|"]
    for cls, row in new["per_class"].items():
        lines.append(f"| {cls} | {row['n']} | {old['per_class'][cls]['agree']:.1%} | {row['agree']:.1%} |")
    for name, part in (("Old", old), ("New", new)):
        lines += ["", f"{name} judge, confusion (eye → judge):", "",
                  "| eye \\ judge | " + " | ".join(CLASSES) + " |", "|---|" + "---:|" * len(CLASSES)]
        for truth in CLASSES:
            counts = [part["confusion"].get(f"{truth}->{got}", 0) for got in CLASSES]
            if sum(counts):
                lines.append(f"| {truth} | " + " | ".join(str(c) if c else "·" for c in counts) + " |")
    return "\n".join(lines) + "\n"


def disagreement_sheet(folder: Path, labels: dict[str, dict], judged: dict[str, dict], path: Path,
                       columns: int = 8) -> int:
    """One contact sheet of every object where the new judge and the eye disagree, each labelled with its id, the
    eye's label and the judge's verdict, so anyone can look at the disagreements themselves. Returns their count."""
    from PIL import Image, ImageDraw

    from judge_check_set import GAP, TILE, label_font, tile_of

    manifest = {str(item["id"]): item for item in load_set(folder)[0]}
    wrong = [k for k in sorted(labels, key=int) if labels[k]["shape"] != judged[k]["new"]]
    font, strip = label_font(14), 54
    rows = max(1, -(-len(wrong) // columns))
    sheet = Image.new("RGB", (columns * (TILE + GAP) + GAP, rows * (TILE + strip + GAP) + GAP), (30, 30, 30))
    draw = ImageDraw.Draw(sheet)
    for slot, key in enumerate(wrong):
        x, y = GAP + slot % columns * (TILE + GAP), GAP + slot // columns * (TILE + strip + GAP)
        sheet.paste(tile_of(Image.open(folder / manifest[key]["file"]).convert("RGB")), (x, y))
        draw.text((x + 3, y + TILE + 2), f"{int(key):04d}", fill=(170, 170, 170), font=font)
        draw.text((x + 3, y + TILE + 19), f"eye: {labels[key]['shape']}", fill=(255, 255, 255), font=font)
        draw.text((x + 3, y + TILE + 36), f"judge: {judged[key]['new']}", fill=(255, 210, 80), font=font)
    sheet.save(path)
    return len(wrong)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def held_out(labels: dict[str, dict]) -> dict[str, dict]:
    """The odd-numbered half: the one the judge's limits were not fitted on."""
    return {k: v for k, v in labels.items() if int(k) % 2}


def measure(folder: Path) -> dict:
    from microworld.fidelity import DEVIATIONS, MALFORMED_BELOW, MIN_SOLIDITY, PREFERENCE, THRESHOLDS

    manifest, labels = load_set(folder)
    manifest = [item for item in manifest if str(item["id"]) in labels]
    judged = verdicts(folder, manifest)
    odd = held_out(labels)
    result = {"thresholds": {**THRESHOLDS, "other shapes": MALFORMED_BELOW}, "preference": PREFERENCE,
              "deviations": DEVIATIONS, "min_solidity": MIN_SOLIDITY,
              "old": agreement(labels, judged, "old"), "new": agreement(labels, judged, "new"),
              "old_held_out": agreement(odd, judged, "old"), "new_held_out": agreement(odd, judged, "new"),
              "verdicts": judged}
    second = load_second_pass(folder)
    if second:
        agreed = consensus(labels, second)
        result["second_pass"] = {"eye_against_eye": eye_against_eye(labels, second),
                                 "old": agreement(second, judged, "old"), "new": agreement(second, judged, "new"),
                                 "old_consensus": agreement(agreed, judged, "old"),
                                 "new_consensus": agreement(agreed, judged, "new"),
                                 "old_consensus_held_out": agreement(held_out(agreed), judged, "old"),
                                 "new_consensus_held_out": agreement(held_out(agreed), judged, "new")}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default=str(REPO / "bench" / "results" / "judge_check_set"))
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "judge_agreement"))
    parser.add_argument("--fit", action="store_true",
                        help="fit thresholds and preferences on the even-numbered half (microworld/fidelity.py "
                             "ships them) and print them instead of measuring")
    args = parser.parse_args(argv)
    import torch  # deferred: only the measurement needs it

    torch.set_num_threads(1)
    if args.fit:
        from microworld.check_set import fit_thresholds, generator_floors, object_fits

        manifest, labels = load_set(Path(args.set))
        even = {k: v for k, v in labels.items() if int(k) % 2 == 0}
        fits = object_fits(Path(args.set), [item for item in manifest if str(item["id"]) in even])
        print(json.dumps(fit_thresholds(even, fits, generator_floors()), indent=1))
        return 0
    result = measure(Path(args.set))
    out = Path(args.out)
    labels = load_set(Path(args.set))[1]
    sheet = out.with_name(out.name + "_disagreements.png")
    result["disagreements"] = {"count": disagreement_sheet(Path(args.set), labels, result["verdicts"], sheet),
                               "sheet": sheet.name}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    out.with_suffix(".md").write_text(table(result), encoding="utf-8")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
