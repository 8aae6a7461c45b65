"""The `qpolicy` command on the shipped digits16: layers, quantize (uniform and --schedule), bad files."""
import json

import numpy as np
import pytest

from qpolicy import load_denoiser, make_sampler
from qpolicy.cli import main
from qpolicy.schedule import BitSchedule


@pytest.fixture(scope="module")
def den():
    return load_denoiser("digits16")


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_layers_json(capsys, den):
    rows = run_json(capsys, ["layers", "--model", "digits16", "--json"])
    assert [r["path"] for r in rows] == [l.path for l in den.layers]
    assert {"path", "kind", "params", "macs"} <= set(rows[0])


def test_quantize_uniform_and_schedule_round_trip(capsys, den, tmp_path):
    base = ["quantize", "--model", "digits16", "--n", "4", "--steps", "3", "--no-fd", "--json"]
    u = run_json(capsys, base + ["--w", "8", "--a", "8"])
    for k in ("bops_rel_fp32", "bops_rel_w8a8", "mean_bits_w", "mean_bits_a", "weight_mbytes", "traj_error",
              "final_error", "n", "steps"):
        assert k in u
    assert u["bops_rel_fp32"] == pytest.approx(64 / 1024) and u["steps"] == 3 and u["n"] == 4
    sched = BitSchedule.for_denoiser(den, make_sampler(den.schedule, "ddim", 3), 8, 8)
    path = tmp_path / "s.json"
    sched.save(path)
    s = run_json(capsys, ["quantize", "--model", "digits16", "--n", "4", "--no-fd", "--json", "--schedule", str(path)])
    assert s["final_error"] == pytest.approx(u["final_error"], rel=1e-5)
    minimal = tmp_path / "m.json"
    L = len(den.layers)
    minimal.write_text(json.dumps({"bits_w": np.full((3, L), 8).tolist(), "bits_a": np.full((3, L), 8).tolist()}))
    m = run_json(capsys, ["quantize", "--model", "digits16", "--n", "4", "--no-fd", "--json", "--schedule",
                          str(minimal)])
    assert m["final_error"] == pytest.approx(u["final_error"], rel=1e-5)


def test_quantize_refuses_schedule_of_another_model(capsys, den, tmp_path):
    sched = BitSchedule.for_denoiser(den, make_sampler(den.schedule, "ddim", 3), 8, 8)
    d = sched.to_dict()
    d["model_id"], d["layer_hash"] = "patches32", "0" * 16
    path = tmp_path / "other.json"
    path.write_text(json.dumps(d))
    assert main(["quantize", "--model", "digits16", "--n", "4", "--no-fd", "--schedule", str(path)]) == 2
    err = capsys.readouterr().err
    assert "patches32" in err and "digits16" in err


def test_quantize_bad_bits_and_missing_model(capsys):
    assert main(["quantize", "--model", "digits16", "--w", "7", "--a", "8", "--n", "2", "--steps", "2",
                 "--no-fd"]) == 2
    assert "not an accepted bitwidth" in capsys.readouterr().err
    assert main(["layers", "--model", "no_such_model"]) == 2
    assert "shipped models" in capsys.readouterr().err
    assert main(["quantize", "--model", "digits16", "--w", "4", "--a", "8", "--keep-ends", "9", "--n", "2",
                 "--no-fd"]) == 2
    assert "--keep-ends" in capsys.readouterr().err


def test_quantize_keep_ends_raises_only_the_end_layers(capsys):
    common = ["quantize", "--model", "digits16", "--w", "4", "--a", "8", "--n", "4", "--steps", "2", "--no-fd",
              "--json"]
    assert main(common) == 0
    strict = json.loads(capsys.readouterr().out)
    assert main(common + ["--keep-ends", "8"]) == 0
    ends = json.loads(capsys.readouterr().out)
    assert ends["keep_ends"] == 8 and "keep_ends" not in strict
    # conv_in and conv_out hold 147,456 of digits16's 63,987,712 MACs: W8A8 instead of W4A8 there
    macs, ends_macs = 63_987_712, 2 * 73_728
    expect = (4 * 8 * (macs - ends_macs) + 8 * 8 * ends_macs) / (32 * 32 * macs)
    assert abs(ends["bops_rel_fp32"] - expect) < 1e-9 and abs(strict["bops_rel_fp32"] - 4 * 8 / 1024) < 1e-9


def test_calibrate_stores_ranges_with_the_model(tmp_path, tiny_denoiser):
    from qpolicy import QuantConfig, make_engine
    from qpolicy.denoiser import save_checkpoint

    ck = save_checkpoint(tmp_path / "ck", module=tiny_denoiser.module, params=tiny_denoiser.params,
                         schedule=tiny_denoiser.schedule, dataset="digits", image_shape=(8, 8, 1), train={})
    assert main(["calibrate", "--model", str(ck), "--steps", "3", "--n", "4", "--buckets", "2"]) == 0
    files = list((ck / "calib").glob("*.npy"))
    assert len(files) == 1
    stored = np.load(files[0])
    assert stored.shape == (2, len(tiny_denoiser.layers), 2) and (stored[..., 0] <= stored[..., 1]).all()
    eng = make_engine(load_denoiser(ck), steps=3, qcfg=QuantConfig(act_ranges="static", range_buckets=2),
                      calib_n=4)
    np.testing.assert_array_equal(np.asarray(eng.act_ranges_table), stored)
