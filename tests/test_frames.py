"""`grace study frames`: the statistics as pure functions against closed forms and scipy, and the study end to end
on the small VQA world (both backbones, two seeds, lanes then one judging invocation, its page generated)."""
import json
import math

import numpy as np
import pytest

from grace_app.studies.frames import bootstrap_far_minus_near, judge, non_inferior, spearman_test, t_interval

pytestmark = pytest.mark.usefixtures("one_thread")


def test_t_interval_and_non_inferiority_against_scipy():
    from scipy import stats

    d = [0.5, -0.2, 0.9, 0.1, 0.4]
    ci = t_interval(d)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=np.mean(d), scale=stats.sem(d))
    assert ci["ci95"] == pytest.approx([lo, hi]) and ci["n"] == 5
    assert non_inferior(d, margin=1.0)["verdict"] == "holds"  # lower end above -1
    assert non_inferior([-3.1, -2.9, -3.0], margin=1.0)["verdict"] == "fails"  # wholly below 0
    assert non_inferior([-1.5, 0.5, -0.9], margin=1.0)["verdict"] == "inconclusive"
    assert non_inferior([1.0], margin=1.0)["verdict"] == "inconclusive"  # one seed: no interval
    assert non_inferior([0.5, 0.5], margin=1.0)["verdict"] == "inconclusive"  # no spread: a zero-width interval


def test_far_minus_near_bootstrap():
    near = [[1.0, 1.0, 1.0], [2.0, 2.0]]
    far = [[4.0, 4.0], [6.0, 6.0, 6.0, 6.0]]
    d = bootstrap_far_minus_near(near, far)
    assert d["mean"] == pytest.approx(5.0 - 1.5) and d["ci95"] == pytest.approx([3.5, 3.5])  # no spread: exact
    rng = np.random.default_rng(0)
    noisy = bootstrap_far_minus_near([rng.normal(0, 1, 200)], [rng.normal(0.05, 1, 200)])
    assert noisy["ci95"][0] < noisy["mean"] < noisy["ci95"][1]


def test_spearman_against_scipy():
    from scipy import stats

    x, y = [1.0, 2.0, 3.5, 4.0, 7.0], [9.0, 7.0, 8.0, 3.0, 1.0]
    t = spearman_test(x, y)
    assert t["rho"] == pytest.approx(stats.spearmanr(x, y).statistic) and t["p"] == pytest.approx(
        stats.spearmanr(x, y).pvalue)
    assert spearman_test([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["rho"] is None  # constant: undefined, not a number


def _rec(id_, ood, sets=None):
    return {"axes": {"id": id_, "near": ood, "far": ood, "ood": ood, "adv": 0.0}, "sets": sets or {}}


def test_judge_digrap_against_rows():
    rows = {"DiGraP": {"0": _rec(80, 50), "1": _rec(81, 51), "2": _rec(79, 52)},
            "FT": {"0": _rec(70, 50.5), "1": _rec(71.5, 50.8), "2": _rec(68, 51.9)},
            "zero-shot": {"zero": _rec(40, 60)}}
    v = {x["claim"]: x for x in judge({"clip": rows})}
    assert v["DiGraP at or above FT on ID"]["verdict"] == "holds"
    assert v["DiGraP at or above FT on ID"]["mean"] == pytest.approx((10 + 9.5 + 11) / 3)
    assert v["DiGraP at or above zero-shot on OOD"]["verdict"] == "fails"  # 9-10 points below the one zero-shot
    assert v["DiGraP at or above zero-shot on ID"]["n"] == 3


def test_config_id_ignores_seed_and_device_and_judge_refuses_two_configs_in_a_row():
    from grace_app.studies.frames import config_id
    from grace_plugin.errors import UsageError

    a = {"train": {"seed": 0, "device": "cpu", "lr": 1e-3}, "recipe": {"rho": 0.1}}
    assert config_id("ft", a) == config_id("ft", {"train": {"seed": 3, "device": "cuda", "lr": 1e-3},
                                                  "recipe": {"rho": 0.1}})
    assert config_id("ft", a) != config_id("ft", {"train": {"seed": 0, "device": "cpu", "lr": 2e-3},
                                                  "recipe": {"rho": 0.1}})
    assert config_id("ft", a) != config_id("lp_ft", a) and a["train"]["seed"] == 0  # the input is not changed
    rows = {"DiGraP": {"0": _rec(80, 50) | {"config_id": "x"}, "1": _rec(81, 51) | {"config_id": "y"}}}
    with pytest.raises(UsageError, match="clip DiGraP: seeds ran under 2 configs"):
        judge({"clip": rows})


def test_frames_lanes_then_judge_on_the_small_world(tmp_path, capsys):
    """One backbone, two rows: a lane that does not judge, then the judging invocation reuses its run and adds a
    seed; the page is generated from frames.json."""
    from grace_app.cli import main
    from grace_app.studies.publish import add_source, page_markdown

    out = tmp_path / "fr"
    common = ["study", "frames", "--size", "small", "--steps", "2", "--pretrain-steps", "3", "--n-adv", "2",
              "--n-shift", "20", "--out", str(out), "--no-progress", "--backbones", "clip", "--methods",
              "zero-shot,DiGraP"]
    # seed 1's lane runs first (it analyses: no lower seed has), then seed 0's, then seed 2's (it does not)
    for k in (1, 0, 2):
        assert main(common + ["--seeds", f"{k}-{k}", "--no-judge"]) == 0 and not (out / "frames.json").exists()
    seed1 = out / "runs" / "clip" / "digrap" / "seed1" / "eval" / "report.json"
    before = seed1.stat().st_mtime_ns
    capsys.readouterr()
    assert main(common + ["--seeds", "0-2"]) == 0
    assert "clip: 3 runs reused, 0 resumed, 0 trained" in capsys.readouterr().out
    assert seed1.stat().st_mtime_ns == before  # its evaluation (with the shift suite) reused, not redone without
    assert main(common + ["--seeds", "0-3", "--status"]) == 0  # what the folder holds; nothing runs
    status = capsys.readouterr().out
    assert "clip zero-shot: stored" in status and "clip DiGraP: stored 0,1,2; missing 3" in status
    doc = json.loads((out / "frames.json").read_text())
    recs = doc["records"]["clip"]["DiGraP"]
    assert set(recs) == {"0", "1", "2"} and "analysis" in recs["0"] and "analysis" not in recs["2"]
    assert len({r["config_id"] for r in recs.values()}) == 1  # one row, one config
    v = {x["claim"]: x for x in doc["verdicts"]}
    assert v["DiGraP at or above zero-shot on ID"]["n"] == 3
    assert page_markdown(doc).startswith("# FRAMES-VQA study, VQA world seed 0")
    assert set(doc["pretrain_seconds"]) == {"clip"} and doc["pretrain_seconds"]["clip"] > 0
    assert "for pretraining the tiny CLIP" in page_markdown(doc)
    assert add_source(out, tmp_path / "pages").name == "frames.json"
    assert main(common[:5] + ["3"] + common[6:] + ["--seeds", "0-0"]) == 2  # another run length: refused
    assert "steps=2, not 3" in capsys.readouterr().err
    assert main(["study", "frames", "--backbones", "vit", "--out", str(tmp_path / "x")]) == 2
    assert main(["study", "table6", "--backbones", "clip", "--out", str(tmp_path / "y")]) == 2


@pytest.mark.slow
def test_frames_study_end_to_end_small(tmp_path, capsys):
    from grace_app.cli import main
    from grace_app.studies.publish import add_source, page_markdown

    out = tmp_path / "fr"
    common = ["study", "frames", "--size", "small", "--steps", "2", "--pretrain-steps", "3", "--n-adv", "2",
              "--n-shift", "20", "--out", str(out), "--no-progress"]
    # two lanes (one per backbone) that do not judge, then one invocation that reuses everything and judges
    assert main(common + ["--backbones", "clip", "--methods", "zero-shot,FT,DiGraP", "--seeds", "0-1",
                          "--no-judge"]) == 0
    assert not (out / "frames.json").exists()
    assert main(common + ["--backbones", "coca", "--methods", "zero-shot,DiGraP", "--seeds", "0-1", "--no-judge"]) == 0
    capsys.readouterr()
    assert main(common + ["--backbones", "clip,coca", "--methods", "zero-shot,FT,DiGraP", "--seeds", "0-1"]) == 0
    assert "clip: 4 runs reused, 0 resumed, 0 trained" in capsys.readouterr().out  # the lane's runs, not retrained
    doc = json.loads((out / "frames.json").read_text())
    recs = doc["records"]
    assert set(recs) == {"clip", "coca"} and set(recs["clip"]["DiGraP"]) == {"0", "1"}
    assert "analysis" in recs["clip"]["DiGraP"]["0"] and "analysis" not in recs["clip"]["DiGraP"]["1"]
    assert "samples_by_set" in recs["coca"]["zero-shot"]["zero"]["analysis"]
    claims = [v["claim"] for v in doc["verdicts"]]
    assert "DiGraP at or above FT on ID" in claims and any(c.startswith("near-OOD sets closer") for c in claims)
    assert all(v["verdict"] in ("holds", "fails", "inconclusive", "image", "question") for v in doc["verdicts"])
    assert (out / "runs" / "coca" / "digrap" / "seed1" / "eval" / "report.json").is_file()
    md = page_markdown(doc)
    assert md.startswith("# FRAMES-VQA study, VQA world seed 0") and "## coca" in md and "## Verdicts" in md
    assert add_source(out, tmp_path / "pages").name == "frames.json"
    assert not math.isnan(sum(r["axes"]["id"] for r in recs["clip"]["FT"].values()))


def test_a_clip_lane_does_not_wait_for_a_coca_pretraining(tmp_path, monkeypatch):
    """The testbed's locks: the world under one, each backbone's pretrained model under its own, so a CLIP lane
    goes on while another lane pretrains the CoCa (it waited for the CoCa's whole pretraining before)."""
    import threading

    from grace_app.studies import quickstart_vqa as qv

    inside, release, done = threading.Event(), threading.Event(), []
    real = qv._pretrained

    def fake(backbone, size, steps):  # the CoCa's pretraining blocks until released
        if backbone == "coca":
            return "tiny CoCa", lambda data, out, progress: (inside.set(), release.wait(240))
        return real(backbone, size, steps)

    monkeypatch.setattr(qv, "_pretrained", fake)
    out = tmp_path / "fr"
    coca = threading.Thread(target=qv.prepare_vqa_testbed, args=(out, 0, "small", 3, False, lambda _m: None, {},
                                                                 "coca"), daemon=True)
    coca.start()
    try:
        assert inside.wait(120)
        clip = threading.Thread(target=lambda: done.append(qv.prepare_vqa_testbed(out, 0, "small", 3, False,
                                                                                  lambda _m: None, {})), daemon=True)
        clip.start()
        clip.join(timeout=120)
        assert done and (done[0][1] / "open_clip_model.safetensors").is_file() and not release.is_set()
    finally:
        release.set()
        coca.join(timeout=60)


def test_the_page_says_where_tuned_values_were_selected():
    """A study on world 1 that reuses values tuned on world 0 says so beside each tuned row."""
    from grace_app.studies.frames_page import frames_markdown

    rows = {"DiGraP": {"0": _rec(80, 50, {"vqav2": 80.0}), "1": _rec(81, 51, {"vqav2": 81.0})}}
    doc = {"world_seed": 1, "steps": 2, "attack": "apgd-ce", "eps": 4 / 255, "n_adv": 2, "records": {"clip": rows},
           "tuned": {"clip": ["ft", "digrap"]}, "tuned_on": {"clip": {"ft": 0, "digrap": 1}}, "verdicts": []}
    md = frames_markdown(doc)
    assert "clip: ft (values selected on world seed 0, reused here), digrap." in md
