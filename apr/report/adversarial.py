"""The adversarial section of the report (``python -m apr.adversarial`` results, schema ``apr.adv/1``).

Per run (one ``<run_name>.adv.json`` each): clean accuracy and robust accuracy per attack (FGSM,
PGD-k, AutoAttack), with each attack's settings (eps as n/255, norm, steps, restarts, images,
library and version) in a table of their own, the gradient-masking flags that the evaluation wrote
marked on the very numbers they concern, and the eps sweep as a figure. Every number in the
Markdown is ``format_percent`` of the matching value in the section's summary block. No torch,
no model: the stored counts, settings and flags are all it needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from apr.report.common import (ReportError, check_count, check_fraction, colours, format_percent, markdown_table,
                               name_runs, new_figure, pct, recipe, run_label, save_png)
from apr.report.sections import register

__all__ = ["SCHEMA", "ATTACK_ORDER", "FIGURE", "MASK", "check_adv_result", "summarize_adversarial",
           "render_adversarial", "eps_text", "flag_concerns"]

SCHEMA = "apr.adv/1"  # apr.adversarial.run.SCHEMA, not imported: that module loads torch
ATTACK_ORDER = ("fgsm", "pgd", "autoattack")
ATTACK_TITLES = {"fgsm": "FGSM", "pgd": "PGD", "autoattack": "AutoAttack"}
FIGURE = "adversarial_eps_sweep.png"
MASK = "⚠"
#: Flag codes written by apr.adversarial.run.masking_flags, in words (the numbers are in the cells).
FLAG_WORDS = {
    "pgd_weaker_than_fgsm": "PGD leaves more images correct than FGSM (a multi-step attack should not)",
    "robust_above_clean": "{attack} robust accuracy above the clean accuracy",
    "eps_sweep_not_decreasing": "robust accuracy rises with eps in the eps sweep",
    "eps_sweep_flat": "robust accuracy does not fall over the eps sweep",
}


# --------------------------------------------------------------------------- checks

def _check_correct(block: Mapping[str, Any], rate_key: str, where: str) -> tuple[int, int]:
    n = check_count(block.get("n"), f"{where}: n")
    correct = check_count(block.get("correct"), f"{where}: correct", positive=False)
    if correct > n:
        raise ReportError(f"{where}: correct = {correct} is more than the {n} images attacked; re-run it")
    rate = check_fraction(block.get(rate_key), f"{where}: {rate_key}")
    if not math.isclose(rate, correct / n, abs_tol=1e-9):
        raise ReportError(f"{where}: {rate_key} {rate} is not correct/n = {correct}/{n}; re-run it")
    return correct, n


def _check_sweep(sweep: Any, where: str) -> None:
    if sweep is None:
        return
    lists = [sweep.get(k) if isinstance(sweep, Mapping) else None for k in ("eps", "robust_accuracy", "n")]
    if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists}) != 1 or not lists[0]:
        raise ReportError(f"{where}: eps_sweep needs lists 'eps', 'robust_accuracy' and 'n' of one length")
    for eps, rate, n in zip(*lists):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ReportError(f"{where}: eps_sweep eps {eps!r} is not a positive number")
        check_fraction(rate, f"{where}: eps_sweep robust_accuracy")
        check_count(n, f"{where}: eps_sweep n")


def check_adv_result(result: Any, source: str) -> dict:
    """An ``apr.adv/1`` results dict whose counts are possible (correct <= n, rates = correct / n, every
    attack on the clean pass's images) and whose settings say what was run (ReportError otherwise)."""
    if not isinstance(result, Mapping) or result.get("schema") != SCHEMA:
        raise ReportError(f"{source}: not an adversarial results file (expected schema {SCHEMA!r})")
    if not isinstance(result.get("clean"), Mapping):
        raise ReportError(f"{source}: no clean pass yet; re-run python -m apr.adversarial, it resumes")
    _, n = _check_correct(result["clean"], "accuracy", f"{source}: clean")
    attacks = result.get("attacks")
    if not isinstance(attacks, Mapping):
        raise ReportError(f"{source}: results lack the 'attacks' block")
    for name, attack in attacks.items():
        where = f"{source}: attack {name!r}"
        if not isinstance(attack, Mapping) or not isinstance(attack.get("settings"), Mapping):
            raise ReportError(f"{where} lacks its settings")
        eps = attack["settings"].get("eps")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ReportError(f"{where}: eps {eps!r} is not a positive number")
        if _check_correct(attack, "robust_accuracy", where)[1] != n:
            raise ReportError(f"{where} ran on {attack['n']} images but the clean pass on {n}: they are not the "
                              "same images; re-run python -m apr.adversarial")
    _check_sweep(result.get("eps_sweep"), source)
    flags = result.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise ReportError(f"{source}: 'flags' must be a list of strings (written by python -m apr.adversarial)")
    return dict(result)


# --------------------------------------------------------------------------- numbers

def flag_concerns(flag: str) -> tuple[str, list[str]]:
    """(code, the columns it concerns: attack names or 'eps_sweep') of a masking flag of the results file."""
    code, _, detail = flag.partition(":")
    if code == "pgd_weaker_than_fgsm":
        return code, ["fgsm", "pgd"]
    if code == "robust_above_clean":
        words = detail.split()
        return code, words[:1] + ["clean"]
    if code.startswith("eps_sweep"):
        return code, ["eps_sweep"]
    return code, []


def _flag_text(code: str, concerns: list[str], flag: str) -> str:
    if code not in FLAG_WORDS:
        return flag  # a flag this report does not know: shown as written
    attack = ATTACK_TITLES.get(concerns[0], concerns[0]) if concerns else "?"
    return FLAG_WORDS[code].format(attack=attack)


def _run_summary(result: dict, source: str) -> dict[str, Any]:
    names = [a for a in ATTACK_ORDER if a in result["attacks"]] + \
        [a for a in result["attacks"] if a not in ATTACK_ORDER]
    attacks = {name: {"robust_accuracy": pct(a["robust_accuracy"]), "correct": a["correct"], "n": a["n"],
                      "settings": dict(a["settings"]), "seconds": a.get("seconds")}
               for name in names for a in [result["attacks"][name]]}
    sweep = result.get("eps_sweep")
    flags = []
    for flag in result.get("flags", []):
        code, concerns = flag_concerns(flag)
        flags.append({"flag": flag, "code": code, "concerns": concerns, "text": _flag_text(code, concerns, flag)})
    aug, extra = recipe(result)
    return {"run_name": result.get("run_name") or Path(source).stem, "label": run_label(result), "aug": aug,
            "extra_roots": extra, "source": source, "checkpoint": result.get("checkpoint"),
            "checkpoint_sha256": result.get("checkpoint_sha256"), "model_name": result.get("model_name"),
            "precision": result.get("precision"), "data": result.get("dataset"), "seed": result.get("seed"),
            "finished": bool(result.get("finished")), "clean_accuracy": pct(result["clean"]["accuracy"]),
            "clean": {"correct": result["clean"]["correct"], "n": result["clean"]["n"]}, "attacks": attacks,
            "eps_sweep": None if sweep is None else {"eps": list(sweep["eps"]), "n": list(sweep["n"]),
                                                      "robust_accuracy": [pct(v) for v in sweep["robust_accuracy"]]},
            "flags": flags}


def summarize_adversarial(results: list[tuple[dict, str]]) -> dict[str, Any]:
    """Every number of the adversarial section (percent, unrounded): the section's block in summary.json."""
    runs = name_runs([_run_summary(check_adv_result(r, src), src) for r, src in results])
    names = list(dict.fromkeys(a for run in runs for a in run["attacks"]))
    return {"schema": SCHEMA, "units": "percent", "attacks": names, "runs": runs,
            "settings": _settings_rows(runs, names)}


def _settings_rows(runs: list[dict], names: list[str]) -> list[dict[str, Any]]:
    """One row per attack and distinct (settings, images): which runs it was applied to."""
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        for run in runs:
            if name in run["attacks"]:
                attack = run["attacks"][name]
                key = json.dumps([name, attack["settings"], attack["n"]], sort_keys=True)
                rows.setdefault(key, {"attack": name, "settings": attack["settings"], "n": attack["n"], "runs": []})
                rows[key]["runs"].append(run["display_name"])
    return list(rows.values())


# --------------------------------------------------------------------------- markdown

def eps_text(eps: float | None, norm: str | None = "Linf") -> str:
    """An eps (or step size) as it is spoken: n/255 for Linf in [0, 1] pixels, the plain number for L2."""
    if eps is None:
        return "—"
    if norm not in (None, "Linf"):
        return f"{eps:g}"
    n = eps * 255
    return f"{round(n)}/255" if math.isclose(n, round(n), abs_tol=1e-6) else f"{n:.3g}/255"


def _column_title(name: str, runs: list[dict]) -> str:
    settings = [run["attacks"][name]["settings"] for run in runs if name in run["attacks"]]
    title = ATTACK_TITLES.get(name, name)
    if name == "pgd":
        steps = {s.get("steps") for s in settings}
        title = f"PGD-{steps.pop()}" if len(steps) == 1 else "PGD-k"
    eps = {(s.get("eps"), s.get("norm")) for s in settings}
    if len(eps) != 1:
        return title  # the settings table says which run used which eps
    value, norm = eps.pop()
    return f"{title} ({eps_text(value, norm)})" if norm == "Linf" else f"{title} ({norm} {eps_text(value, norm)})"


def _cell(run: dict, column: str, value: float | None) -> str:
    marked = any(column in flag["concerns"] for flag in run["flags"])
    return format_percent(value) + (f" {MASK}" if marked and value is not None else "")


def _sweep_cell(run: dict) -> str:
    if run["eps_sweep"] is None:
        return "—"
    return f"{MASK} see flags" if any("eps_sweep" in f["concerns"] for f in run["flags"]) else "falls with eps"


def _results_table(summary: dict) -> list[str]:
    names, runs = summary["attacks"], summary["runs"]
    header = ["Method", "Clean acc."] + [_column_title(n, runs) for n in names] + \
        ["Eps sweep", "Gradient-masking flags"]
    rows = [[run["display_name"], _cell(run, "clean", run["clean_accuracy"])]
            + [_cell(run, n, run["attacks"].get(n, {}).get("robust_accuracy")) for n in names]
            + [_sweep_cell(run), "; ".join(f"{MASK} {f['text']}" for f in run["flags"]) or "none"]
            for run in runs]
    return ["### Robust accuracy", ""] + markdown_table(header, rows)


def _settings_table(summary: dict) -> list[str]:
    rows = []
    for row in summary["settings"]:
        s, auto = row["settings"], row["attack"] == "autoattack"
        norm = s.get("norm")
        steps = f"{s.get('apgd_iters')} (APGD)" if auto else str(s.get("steps", "—"))
        details = (f"{s.get('version')}: {', '.join(s.get('attacks') or [])}; APGD-T / FAB-T target classes "
                   f"{s.get('apgd_t_target_classes', '—')} / {s.get('fab_t_target_classes', '—')}; Square queries "
                   f"{s.get('square_queries', '—')}; seed {s.get('seed')}") if auto else "—"
        random_start = "—" if auto else ("yes" if s.get("random_start") else "no")
        rows.append([ATTACK_TITLES.get(row["attack"], row["attack"]), ", ".join(row["runs"]), eps_text(s["eps"], norm),
                     str(norm), steps, "—" if auto else eps_text(s.get("alpha"), norm),
                     str(s.get("restarts", "—")), random_start, str(row["n"]),
                     f"{s.get('library', '?')} {s.get('library_version') or ''}".strip(), details])
    header = ["Attack", "Runs", "Eps", "Norm", "Steps", "Step size", "Restarts", "Random start", "Images",
              "Library", "Details"]
    return ["", "### Attack settings", ""] + markdown_table(header, rows)


def _runs_table(summary: dict) -> list[str]:
    rows = []
    for run in summary["runs"]:
        data = run["data"] if isinstance(run["data"], Mapping) else {}
        what = f"{data.get('kind', '?')}, {run['clean']['n']} of {data.get('total', '?')} images (seed {run['seed']})"
        rows.append([run["display_name"], run["run_name"], what, str(run["precision"]),
                     "yes" if run["finished"] else "no (re-run to finish)",
                     f"`{run['checkpoint']}`" if run["checkpoint"] else "—",
                     (run["checkpoint_sha256"] or "—")[:12]])
    out = ["", "### Adversarial runs", ""]
    out += markdown_table(["Method", "Run", "Images attacked", "Precision", "Finished", "Checkpoint", "SHA-256"], rows)
    if any(run["precision"] == "bf16" for run in summary["runs"]):
        out += ["", "Runs attacked under bf16 autocast: low-precision gradients can mask robustness; "
                    "fp32 is the honest setting."]
    return out


def _markdown(summary: dict, figure: str | None) -> str:
    out = ["## Adversarial robustness", "",
           "Robust accuracy: the share of the attacked images still classified correctly after the attack "
           "(percent, higher is more robust; clean accuracy on the same images). Attacks run in [0, 1] pixel "
           "space with the normalisation inside the model. "
           f"{MASK} marks a number with a sign of gradient masking (Athalye et al. 2018): robustness it shows may "
           "be an artefact of the gradients, not of the model.", ""]
    out += _results_table(summary) + _settings_table(summary) + _runs_table(summary)
    if figure:
        out += ["", f"![Robust accuracy vs eps (PGD sweep)]({figure})"]
    return "\n".join(out + [""])


# --------------------------------------------------------------------------- figure

def _plot_sweep(runs: list[dict], path: Path) -> None:
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    swept = [run for run in runs if run["eps_sweep"]]
    for run, colour in zip(swept, colours(len(swept))):
        sweep = run["eps_sweep"]
        ax.plot([e * 255 for e in sweep["eps"]], sweep["robust_accuracy"], marker="o", color=colour,
                label=run["display_name"] + (f" {MASK}" if any("eps_sweep" in f["concerns"] for f in run["flags"])
                                             else ""))
    ax.set_xlabel("eps (x 1/255, Linf)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("PGD robust accuracy vs eps (should fall)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


# --------------------------------------------------------------------------- the section

def render_adversarial(results: list[tuple[dict, str]], out: Path, plots: bool) -> tuple[str, dict[str, Any]]:
    """The adversarial section: its Markdown and its summary block; the eps-sweep figure goes into ``out``."""
    summary = summarize_adversarial(results)
    figure = FIGURE if plots and any(run["eps_sweep"] for run in summary["runs"]) else None
    if figure:
        _plot_sweep(summary["runs"], out / figure)
    summary["figures"] = [figure] if figure else []
    return _markdown(summary, figure), summary


register("adversarial", SCHEMA, render_adversarial)
