"""quantframe.cli: `quantframe train` runs, compares schemes in fresh processes, rejects bad flags."""

import pytest

from quantframe.cli import main

TINY = ["--steps", "2", "--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "16", "--batch-size", "4",
        "--eval-batches", "1", "--threads", "1", "--no-progress"]  # fmt: skip


def test_compare_writes_the_plot_and_prints_one_row_per_scheme(tmp_path, capsys):
    assert main(["train", *TINY, "--compare", "none,int8-qt", "--out", str(tmp_path)]) == 0
    png = tmp_path / "loss_none_int8-qt.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    header, rule, *rows = out.splitlines()[:4]
    assert header.split()[:3] == ["scheme", "train", "loss"] and "peak RSS (MiB)" in header
    assert [row.split()[0] for row in rows] == ["none", "int8-qt"]
    assert f"loss plot: {png}" in out


def test_single_run_prints_the_summary_and_the_table(tmp_path, capsys):
    assert main(["train", *TINY, "--quantize", "int8-qt", "--out", str(tmp_path), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "lm_head.weight             Int8QTLinearWeight  256x32" in out
    assert "\nint8-qt " in out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags", [["--quantize", "int3"], ["--compare", "none,int3"]])
def test_unknown_scheme_exits_2_listing_the_valid_ones(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", *flags])
    assert exc.value.code == 2
    assert "unknown scheme 'int3'; valid schemes: none, int8-qt" in capsys.readouterr().err


def test_bad_config_value_exits_2_with_the_reason(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dim", "30", "--heads", "4"])
    assert exc.value.code == 2
    assert "dim=30 must split into n_heads=4 heads of even size" in capsys.readouterr().err


def test_quantize_and_compare_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--quantize", "none", "--compare", "none,int8-qt"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_optim_flag_picks_adamw8bit_and_rejects_unknown(tmp_path, capsys):
    main(["train", *TINY, "--quantize", "int8-mp-w8", "--optim", "adamw8bit", "--no-plot", "--out", str(tmp_path)])
    assert "int8-mp-w8" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["train", "--optim", "sgd"])
    assert e.value.code == 2 and "valid: adamw, adamw8bit" in capsys.readouterr().err


@pytest.mark.parametrize("device, dim, steps", [("cpu", 128, 450), ("cuda", 384, 800)])
def test_model_size_defaults_follow_the_device(monkeypatch, device, dim, steps):
    import quantframe.cli as cli

    class Seen(Exception):
        pass

    def fake_train(cfg, progress):
        raise Seen(cfg)

    monkeypatch.setattr(cli, "train", fake_train)
    with pytest.raises(Seen) as seen:
        main(["train", "--device", device, "--no-plot", "--no-progress"])
    cfg = seen.value.args[0]
    assert (cfg.dim, cfg.steps, cfg.device) == (dim, steps, device)
    with pytest.raises(Seen) as seen:  # an explicit flag wins on any device
        main(["train", "--device", device, "--dim", "96", "--no-plot", "--no-progress"])
    assert seen.value.args[0].dim == 96 and seen.value.args[0].steps == steps
