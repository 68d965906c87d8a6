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


def test_bitnet_run_reports_the_loss_before_and_after_ternary_conversion(tmp_path, capsys):
    assert main(["train", *TINY, "--quantize", "bitnet", "--no-plot", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "BitNetTrainingLinearWeight" in out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("scheme"))
    header, cells = lines[at], lines[at + 2].split()  # the row under the header's rule
    assert header.split()[:7] == ["scheme", "train", "loss", "val", "loss", "val", "converted"]
    assert cells[0] == "bitnet" and cells[2] == cells[3]  # val loss == val loss after conversion (4 decimals)
    # the blocks' Linears packed to 2 bits; the output head stays dense (BitNet b1.58's layout)
    assert "bitnet: convert_bitnet_to_ternary_: val loss " in out and "weights 0.114 -> 0.066 MiB" in out


def test_compare_shows_a_dash_where_a_scheme_does_not_convert(monkeypatch, capsys):
    from quantframe import cli

    # in-process stand-ins for the spawned runs: the table is what is tested here
    monkeypatch.setattr(cli, "_run_in_fresh_process", lambda cfg, progress: cli.train(cfg, progress))
    assert main(["train", *TINY, "--steps", "1", "--compare", "none,bitnet", "--no-plot"]) == 0
    header, _, dense, bitnet, *notes = capsys.readouterr().out.splitlines()
    assert header.split()[5:7] == ["val", "converted"]
    assert (dense.split()[0], dense.split()[3]) == ("none", "-")
    assert bitnet.split()[0] == "bitnet" and bitnet.split()[3] != "-"
    assert notes[0] == "" and notes[1].startswith("bitnet: convert_bitnet_to_ternary_: val loss")


def test_save_then_nf4_dora_init_from_fine_tunes_the_adapters(tmp_path, capsys):
    dense = tmp_path / "dense.pt"
    assert main(["train", *TINY, "--quantize", "none", "--save", str(dense), "--no-plot"]) == 0
    assert dense.exists()
    capsys.readouterr()
    assert main(["train", *TINY, "--quantize", "nf4-dora", "--init-from", str(dense), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "lm_head.weight             NF4Tensor  256x32" in out
    assert "\nnf4-dora " in out and "nf4-dora: val loss " in out and "at the start (init-from) -> " in out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quantize", "nf4-dora"], "quantize='nf4-dora' fine-tunes adapters over a frozen base, so it needs init_from"),
        (["--quantize", "nf4-lora", "--init-from", "missing.pt"], "No such file or directory: 'missing.pt'"),
        (["--compare", "none,int8-qt", "--save", "x.pt"], "--save takes one scheme; --compare lists 2"),
    ],
)
def test_fine_tune_flags_exit_2_with_the_reason(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, *flags, "--no-plot"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_init_from_a_checkpoint_of_another_size_exits_2(tmp_path, capsys):
    dense = tmp_path / "dense.pt"
    main(["train", *TINY, "--steps", "1", "--quantize", "none", "--save", str(dense), "--no-plot"])
    with pytest.raises(SystemExit) as exc:
        main(["train", *TINY, "--dim", "64", "--quantize", "nf4-dora", "--init-from", str(dense), "--no-plot"])
    assert exc.value.code == 2
    assert "does not fit this config's model: tok_emb.weight: (256, 32) in the file, (256, 64)" in capsys.readouterr().err
