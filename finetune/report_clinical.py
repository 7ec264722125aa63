"""The report's "Calibration", "Subgroups" and "Site shift" sections, in plain words.

Each reads the aggregates' ``calibration``, ``subgroups`` and ``shift`` entries
(docs/results_schema.md) and says no more than their intervals allow: an ECE "within the noise
floor" shows no miscalibration (it does not prove calibration); groups "clearly differ" only when
the simultaneous interval of their gap lies above 0; a comparison between inits names a winner
only when its paired interval excludes 0; "not estimable" is never replaced by a number.
"""

from __future__ import annotations

from typing import Any

from finetune.config import FinetuneRunConfig
from finetune.plots_clinical import clinical_plot_names, figure_fraction
from medssl.init import reference
from medssl.results import Aggregate


def _num(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _iv(d: dict[str, Any] | None, signed: bool = False) -> str:
    """``0.118 [0.109, 0.123]`` from ``{"mean", "ci"}``; the point alone without an interval."""
    if not d or d.get("mean") is None:
        return "n/a"
    lo, hi = d.get("ci") or [None, None]
    if lo is None or hi is None:
        return _num(d["mean"], signed)
    return f"{_num(d['mean'], signed)} [{_num(lo, signed)}, {_num(hi, signed)}]"


def _order(cfg: FinetuneRunConfig, aggs: list[Aggregate]) -> list[Aggregate]:
    order = [str(i) for i in cfg.init_list]
    return sorted(aggs, key=lambda a: (a.fraction, order.index(a.init) if a.init in order else len(order)))


def clinical_sections(cfg: FinetuneRunConfig, tasks: dict[str, dict], aggregates: list[Aggregate]) -> list[str]:
    """The three sections' markdown lines (each ends with a blank line)."""
    return (_calibration(cfg, tasks, aggregates) + _subgroups(cfg, tasks, aggregates)
            + _shift(cfg, tasks, aggregates))


# --- calibration ------------------------------------------------------------------------------


def _temperature(entry: dict[str, Any]) -> str:
    """The fitted temperatures over seeds: one value, or their range (multi-label: all labels)."""
    values = [v for s in entry["per_seed"].values() for v, f in zip(s["values"], s["fitted"]) if f]
    if not values:
        return "not fitted (one class in validation)"
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if abs(hi - lo) < 0.005 else f"{lo:.2f}–{hi:.2f}"


def _calibration(cfg: FinetuneRunConfig, tasks: dict[str, dict], aggregates: list[Aggregate]) -> list[str]:
    ref = reference(cfg.inits)
    level = round(cfg.bootstrap.confidence * 100)
    lines = ["## Calibration", "",
             (f"Expected calibration error (ECE, {cfg.evaluation.calibration_bins} equal-width bins; the "
              f"equal-mass figures are in results.json) of the test predictions, before and after "
              f"temperature scaling fitted on the validation split only. Binary and multi-class tasks: "
              f"top-label confidence against correctness; multi-label: each label's probability against "
              f"its presence, macro mean over labels. {level}% intervals as the AUC's. An ECE is "
              f"\"within the noise floor\" when it is no larger than the 95th percentile of what "
              f"perfectly calibrated predictions would show at this test size: no miscalibration is "
              f"shown (which is not proof of calibration); \"above the noise floor\" means it is."), ""]
    any_entry = False
    for task in tasks:
        for protocol in cfg.protocols:
            group = _order(cfg, [a for a in aggregates if a.task == task and a.protocol == protocol
                                 and a.calibration is not None])
            if not group:
                continue
            any_entry = True
            head = ["label fraction", "init", "ECE before", "ECE after T", "T", "after T"]
            if ref is not None:
                head.append(f"Δ ECE after T, {ref.label} − init")
            lines += [f"### {task} / {protocol}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            n_after = n_before = 0
            claims = []
            for a in group:
                c = a.calibration
                before, after = c.ece["width"]["before"], c.ece["width"]["after"]
                n_before += before["verdict"] == "within the noise floor"
                n_after += after["verdict"] == "within the noise floor"
                cells = [f"{a.fraction:g}", a.init_label, _iv(before), _iv(after), _temperature(c.temperature),
                         after["verdict"]]
                if ref is not None:
                    d = (c.diff_vs_ssl or {}).get("width", {}).get("after")
                    cells.append(f"{_iv(d, signed=True)} {d['verdict']}" if d else "–")
                    if d and d["verdict"] != "no clear difference":
                        claims.append(f"{d['verdict']} than {a.init_label} at label fraction {a.fraction:g}")
                lines.append("| " + " | ".join(cells) + " |")
            n = len(group)
            verdict = (f"Verdict: before temperature scaling {n_before} of {n} cells are within the noise "
                       f"floor, after it {n_after} of {n}.")
            if ref is not None:
                verdict += (" Against the other inits (after T): " + "; ".join(claims) + "." if claims
                            else f" No init is clearly better or worse calibrated than {ref.label} after T.")
            fraction = figure_fraction(aggregates, task, protocol, "calibration")
            lines += ["", verdict, "",
                      f"Reliability diagram (label fraction {fraction:g}, one panel per init): "
                      f"`plots/{clinical_plot_names(task, protocol)['reliability']}`.", ""]
    if not any_entry:
        lines += ["No cell had validation scores to fit a temperature on.", ""]
    return lines


# --- subgroups --------------------------------------------------------------------------------


def _subgroups(cfg: FinetuneRunConfig, tasks: dict[str, dict], aggregates: list[Aggregate]) -> list[str]:
    ev = cfg.evaluation
    lines = ["## Subgroups", ""]
    if not ev.subgroups:
        return lines + ["Not requested: set `evaluation.subgroups: [sex, age, site, view]` (shard tasks "
                        "whose samples record these attributes).", ""]
    ref = reference(cfg.inits)
    lines += [(f"Test AUC per subgroup of {', '.join(ev.subgroups)}, with ACC, sensitivity and "
               f"specificity at the operating point chosen on validation (Youden's J per seed; the argmax "
               f"for multi-class, with macro one-vs-rest figures). Images whose attribute is unknown are in "
               f"no group. A group with fewer than {ev.min_subgroup_count} test units (patients where known), "
               f"or fewer than {ev.min_subgroup_per_class} with or without a class, is \"not estimable\". "
               f"The worst group and the largest gap (max − min over estimable groups) carry simultaneous "
               f"intervals: the groups \"clearly differ\" only when the gap's interval lies above 0."), ""]
    for task in tasks:
        for protocol in cfg.protocols:
            group = _order(cfg, [a for a in aggregates if a.task == task and a.protocol == protocol
                                 and a.subgroups is not None])
            if not group:
                continue
            fraction = figure_fraction(aggregates, task, protocol, "subgroups")
            shown = [a for a in group if a.fraction == fraction]
            lines += [f"### {task} / {protocol}", ""]
            for attr in ev.subgroups:
                lines += _group_tables(attr, fraction, shown)
            lines += _gap_table(ev.subgroups, group, ref)
            lines += [f"Verdict (label fraction {fraction:g}):", ""]
            lines += [f"- {_attribute_verdict(attr, shown, ref)}" for attr in ev.subgroups]
            lines += ["", f"Forest plot (label fraction {fraction:g}): "
                      f"`plots/{clinical_plot_names(task, protocol)['subgroups']}`.", ""]
    return lines


def _group_tables(attr: str, fraction: float, shown: list[Aggregate]) -> list[str]:
    """The AUC table and the sensitivity / specificity table of one attribute."""
    blocks = {a.init_label: a.subgroups.attributes[attr] for a in shown}
    first = next(iter(blocks.values()))
    unit = "patients" if shown[0].subgroups.resampling == "patients" else "images"
    head = [attr, f"test {unit}"] + list(blocks)
    lines = [f"#### {attr}: test AUC (label fraction {fraction:g})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ops = ["| " + " | ".join([attr] + list(blocks)) + " |", "|" + "---|" * (len(blocks) + 1)]
    for g, info in first["groups"].items():
        if info["status"] != "ok":
            lines.append(f"| {g} | {info['n_units']} | " + " | ".join(f"not estimable: {info['reason']}"
                                                                    for _ in blocks) + " |")
            ops.append(f"| {g} | " + " | ".join("not estimable" for _ in blocks) + " |")
            continue
        lines.append(f"| {g} | {info['n_units']} | " + " | ".join(_iv(b["groups"][g]["auc"]) for b in blocks.values())
                     + " |")
        ops.append(f"| {g} | " + " | ".join(
            f"{_num(b['groups'][g]['sensitivity']['mean'])} / {_num(b['groups'][g]['specificity']['mean'])}"
            for b in blocks.values()) + " |")
    worst, gap = [], []
    for b in blocks.values():
        w = b["worst"]
        worst.append(f"{w['auc']['group']} {_iv(w['auc'])}" if w.get("status") == "ok" else
                     f"not estimable: {w['reason']}")
        gp = b["gap"]
        gap.append(f"{_iv(gp['auc'])} ({gp['auc']['max_group']} − {gp['auc']['min_group']})"
                   if gp.get("status") == "ok" else f"not estimable: {gp['reason']}")
    lines += [f"| worst group | | " + " | ".join(worst) + " |",
              f"| largest gap | | " + " | ".join(gap) + " |", "",
              f"Sensitivity / specificity at the validation threshold ({attr}):", ""] + ops + [""]
    return lines


def _differ(block: dict[str, Any]) -> bool | None:
    """True when the AUC gap's simultaneous interval lies above 0, False when it reaches 0,
    None when the gap is not estimable."""
    gap = block["gap"]
    if gap.get("status") != "ok":
        return None
    lo = gap["auc"]["ci"][0]
    return lo is not None and lo > 0


def _gap_cell(block: dict[str, Any]) -> str:
    differ = _differ(block)
    if differ is None:
        return "not estimable"
    d = block["gap"]["auc"]
    return f"{_iv(d)} {'groups differ' if differ else 'no clear gap'}"


def _gap_table(attributes: list[str], group: list[Aggregate], ref) -> list[str]:
    """The largest AUC gap per attribute and label fraction, per init, and the paired
    difference of each init's gap from the reference's."""
    fractions = sorted({a.fraction for a in group})
    inits = list(dict.fromkeys(a.init_label for a in group))
    others = [i for i in inits if ref is None or i != ref.label]
    head = ["attribute", "label fraction"] + [f"gap {i}" for i in inits]
    if ref is not None and any(i == ref.label for i in inits):
        head += [f"Δ gap {ref.label} − {o}" for o in others]
    else:
        others = []
    lines = ["#### Largest AUC gap between groups (simultaneous intervals)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by = {(a.fraction, a.init_label): a for a in group}
    for attr in attributes:
        for f in fractions:
            cells = [attr, f"{f:g}"]
            cells += [_gap_cell(by[(f, i)].subgroups.attributes[attr]) if (f, i) in by else "–" for i in inits]
            for o in others:
                vs = by[(f, o)].subgroups.attributes[attr].get("gap_vs_ssl") if (f, o) in by else None
                cells.append(f"{_iv(vs['auc'], signed=True)} {vs['auc']['verdict']}" if vs else "–")
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _attribute_verdict(attr: str, shown: list[Aggregate], ref) -> str:
    """One or two sentences on one attribute at one label fraction: do its groups clearly
    differ, for which inits, and does the reference narrow or widen the gap."""
    blocks = {a.init_label: a.subgroups.attributes[attr] for a in shown}
    differ = {i: _differ(b) for i, b in blocks.items()}
    if all(v is None for v in differ.values()):
        reason = next(iter(blocks.values()))["gap"].get("reason", "")
        return f"{attr}: the gap is not estimable ({reason})."
    yes = [i for i, v in differ.items() if v]
    no = [i for i, v in differ.items() if v is False]
    if yes and not no:
        text = f"{attr}: the groups clearly differ for every init"
    elif yes:
        text = f"{attr}: the groups clearly differ for {', '.join(yes)}, not clearly for {', '.join(no)}"
    else:
        text = f"{attr}: no clear difference between groups for any init"
    extremes = {(b["gap"]["auc"]["max_group"], b["gap"]["auc"]["min_group"]) for i, b in blocks.items() if differ[i]}
    if len(extremes) == 1:
        hi, lo = extremes.pop()
        text += f" ({hi} above {lo})"
    text += "."
    if ref is not None and ref.label in blocks:
        comps = []
        for i, b in blocks.items():
            vs = b.get("gap_vs_ssl")
            if vs:
                v = vs["auc"]["verdict"]
                comps.append(f"{v} relative to {i}" if v != "no clear difference"
                             else f"no clear difference in the gap against {i}")
        if comps:
            text += f" {ref.label}: " + "; ".join(comps) + "."
    return text


# --- site shift -------------------------------------------------------------------------------


def _shift(cfg: FinetuneRunConfig, tasks: dict[str, dict], aggregates: list[Aggregate]) -> list[str]:
    ev = cfg.evaluation
    lines = ["## Site shift", ""]
    if ev.shift is None:
        return lines + ["Not requested: set `evaluation.shift: {attribute: site, leave_one_out: true}` (or "
                        "`holdout: [SITE]`) on a shards task whose samples record the site.", ""]
    attr = ev.shift.attribute
    lines += [(f"Each fold trains and selects on the images of the other {attr} values and tests on the "
               f"held-out one (out), beside the test images of the others (in). Drop = AUC in − AUC out "
               f"(positive: worse when the {attr} changes). Intervals resample the patients of both test "
               f"sets independently, on the same draws for every init. An init \"loses least\" only when "
               f"its drop is smaller than every other init's with a paired interval below 0. Protocols: "
               f"{', '.join(ev.shift_protocols(cfg.protocols))}."), ""]
    for task in tasks:
        for protocol in ev.shift_protocols(cfg.protocols):
            for fraction in ev.shift_fractions(cfg.label_fractions):
                group = _order(cfg, [a for a in aggregates if a.task == task and a.protocol == protocol
                                     and a.fraction == fraction and a.shift is not None])
                if not group:
                    continue
                folds = list(dict.fromkeys(h for a in group for h in a.shift.folds))
                head = [f"held-out {attr}"] + [a.init_label for a in group]
                lines += [f"### {task} / {protocol}, label fraction {fraction:g}", "",
                          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                for h in folds:
                    cells = [h]
                    for a in group:
                        f = a.shift.folds.get(h)
                        cells.append("–" if f is None else
                                     f"{_num(f['auc_in']['mean'])} → {_num(f['auc_out']['mean'])}; "
                                     f"drop {_iv(f['drop'], signed=True)}")
                    lines.append("| " + " | ".join(cells) + " |")
                lines.append("")
                for h in folds:
                    text = next(a.shift.folds[h]["verdict"] for a in group if h in a.shift.folds)
                    lines.append(f"- {text}")
                lines += ["", f"Verdict: {group[0].shift.verdict}", ""]
    return lines
