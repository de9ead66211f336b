"""`bidiattn masks`: its table equals the spans' own counts; the PNG shows the differences."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bidiattn import rules
from bidiattn.tools import cli
from bidiattn.tools.compare import compare_layer, family_convention
from bidiattn.tools.layouts import parse_layout
from bidiattn.tools.plot import category_grid

LAYOUT = "text:40,image:280,text:8,image:280,text:30"


def table_rows(out: str) -> dict[tuple[str, str], list[int]]:
    rows, layer = {}, None
    for line in out.splitlines():
        if m := re.match(r"(full|sliding) layers", line):
            layer = m.group(1)
        elif layer and (m := re.match(r"\s+(official|transformers|vllm|causal)\s+([\d,]+)\s+([\d,]+)\s+\+([\d,]+) / -([\d,]+)\s+([\d,]+)$", line)):
            rows[layer, m.group(1)] = [int(x.replace(",", "")) for x in m.groups()[1:]]
    return rows


def test_table_matches_num_pairs_and_the_png_is_written(tmp_path, capsys):
    png = tmp_path / "masks.png"
    assert cli.main(["masks", "--preset", "gemma-4-31b", "--layout", LAYOUT, "--window", "128", "--png", str(png)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 8
    block_ids = parse_layout(LAYOUT).block_ids("gemma4", "official")
    for (layer, label), (allowed, differ, extra, missing, affected) in rows.items():
        family, conv = family_convention(label, "gemma4")
        spans = rules.build(family, conv, layer, block_ids=parse_layout(LAYOUT).block_ids(family, conv), window=128)
        assert allowed == spans.num_pairs()
        official = rules.dense("gemma4", "official", layer, block_ids=block_ids, window=128)
        assert differ == int((spans.to_dense() ^ official).sum()) == extra + missing
        assert affected == int((spans.to_dense() ^ official).any(1).sum())
    # Two images of 280 > W=128: transformers sees (280-128)(280-128+1)/2 more pairs per image.
    assert rows["sliding", "transformers"][2] == 2 * 152 * 153 // 2
    assert rows["full", "transformers"][1] == 0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_default_example_runs(capsys):
    assert cli.main(["masks"]) == 0
    assert "gemma-4-31b" in capsys.readouterr().out


def test_category_grid_keeps_a_single_difference_visible_when_downsampled():
    layout = parse_layout("text:100,image:130,text:70")
    comp = compare_layer("gemma4", "sliding", layout, window=128)
    transformers = comp.stats[1]
    assert transformers.differ_pairs == 3  # (130-128)(130-128+1)/2
    windowless = rules.build_rule(
        rules.rule_for("gemma4", "transformers", "sliding").without_window(),
        block_ids=layout.block_ids("gemma4", "transformers"), window=128, cu_seqlens=transformers.spans.cu_seqlens,
    )
    grid = category_grid(transformers.spans, windowless, comp.official.spans, pixels=64)
    assert grid.shape == (60, 60)
    assert int((grid == 4).sum()) >= 1
    full = category_grid(transformers.spans, windowless, comp.official.spans, pixels=300)
    assert int((full == 4).sum()) == 3


@pytest.mark.parametrize(
    "argv,message",
    [
        (["masks", "--layout", "text:4,picture:3"], "bad layout segment 'picture:3'"),
        (["masks", "--layout", "text:0"], "count must be >= 1"),
        (["masks", "--family", "gemma3"], "give --window"),
        (["masks", "--family", "gemma3", "--window", "0"], "window must be >= 1"),
    ],
)
def test_bad_arguments_give_a_clear_error(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_preset_is_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["masks", "--preset", "gemma-9"])
    assert "invalid choice: 'gemma-9'" in capsys.readouterr().err


def test_version_flag_and_python_m(capsys):
    import bidiattn

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"bidiattn {bidiattn.__version__}\n"
    run = subprocess.run([sys.executable, "-m", "bidiattn", "--version"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout == f"bidiattn {bidiattn.__version__}\n", run.stderr


def test_version_comes_from_the_installed_metadata_with_a_fallback(monkeypatch):
    import importlib.metadata

    import bidiattn

    monkeypatch.setattr(importlib.metadata, "version", lambda name: {"bidiattn": "9.8.7"}[name])
    assert bidiattn._installed_version() == "9.8.7"

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert bidiattn._installed_version() == "0+unknown"


def test_png_without_matplotlib_names_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    png = tmp_path / "masks.png"
    assert cli.main(["masks", "--png", str(png)]) == 2
    captured = capsys.readouterr()
    assert "bidiattn: error: bidiattn masks --png needs matplotlib" in captured.err
    assert "pip install 'bidiattn[cli]'" in captured.err
    assert captured.out == "" and not png.exists()  # refused before any work


def test_png_into_a_missing_folder_is_refused_before_any_work(tmp_path, capsys):
    png = tmp_path / "no-such-folder" / "masks.png"
    assert cli.main(["masks", "--family", "gemma3", "--window", "4", "--png", str(png)]) == 2
    assert f"the folder {png.parent} does not exist" in capsys.readouterr().err
