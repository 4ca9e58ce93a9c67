"""atlas bench --smoke: the benchmark's code path runs on a CPU and writes the documented keys."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atlas.cli import main


def test_bench_smoke_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert {"device", "command", "layer", "model", "scaling", "decode"} <= set(r)
    assert {"B", "T", "H", "D", "atlas_chunked_tok_s", "sdpa_tok_s", "titans_pytorch_tok_s"} <= set(r["layer"])
    assert {"atlas_300m_tok_s", "transformer_300m_tok_s", "atlas_300m_mfu"} <= set(r["model"])
    assert all(s["ms"] > 0 for s in r["scaling"]) and all(d["ms_per_token"] > 0 and d["eager_ms_per_token"] > 0 for d in r["decode"])
    # the fixed-token series: B*T the same at every T
    assert len({s["B"] * s["T"] for s in r["scaling_fixed_tokens"]}) == 1 and [s["B"] for s in r["scaling"]] == [1, 1]
    assert "atlas_chunked" in capsys.readouterr().out
    assert set(r["commands"].values()) == {"atlas bench --smoke"}
    # one section again: the others kept, and the command names what remakes each
    assert main(["bench", "--smoke", "--sections", "decode", "--out", str(out)]) == 0
    r2 = json.loads(out.read_text())
    assert r2["commands"]["decode"] == "atlas bench --smoke --sections decode" and r2["layer"] == r["layer"]


def test_bench_without_a_gpu_is_one_clear_line(tmp_path, capsys, monkeypatch):
    """Not --smoke on a machine without CUDA: an error naming what to do, and --out untouched."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "h100.json"
    out.write_text("{}")
    assert main(["bench", "--sections", "layer", "--out", str(out)]) != 0
    assert "--smoke" in capsys.readouterr().err and out.read_text() == "{}"


def test_bench_smoke_keeps_off_the_committed_results(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # where benchmarks/results/h100.json would be written
    assert main(["bench", "--smoke"]) != 0
    assert "--out" in capsys.readouterr().err and not (tmp_path / "benchmarks").exists()


def test_results_of_two_devices_never_share_a_file(tmp_path, capsys):
    """The default --out is named by the GPU; an --out measured on another device is refused, not
    replaced (a run on the H200 once would have emptied h100.json of its other sections)."""
    from atlas.bench import default_out
    assert default_out("NVIDIA H100 80GB HBM3") == "benchmarks/results/h100.json"
    assert default_out("NVIDIA H200") == "benchmarks/results/h200.json"
    assert default_out("NVIDIA A100-SXM4-80GB") == "benchmarks/results/a100.json"
    out = tmp_path / "h100.json"
    kept = json.dumps({"device": "NVIDIA H100 80GB HBM3", "layer": {"B": 2}})
    out.write_text(kept)
    for sections in (["--sections", "decode"], []):  # one section, and all of them
        assert main(["bench", "--smoke", *sections, "--out", str(out)]) != 0
        err = capsys.readouterr().err
        assert "NVIDIA H100 80GB HBM3" in err and "another --out" in err and out.read_text() == kept
    for text, said in (("{not json", "not JSON"), ("[1, 2]", "not a results object")):
        out.write_text(text)
        assert main(["bench", "--smoke", "--out", str(out)]) != 0
        assert said in capsys.readouterr().err and out.read_text() == text


def test_kernel_regs_compiles_for_an_h100_without_one():
    """benchmarks/kernel_regs.py: Triton's own ptxas compiles a scan kernel for sm_90 on this
    machine and reports its registers and stack."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_regs.py"), "--kernels", "_fwd_out",
                        "--bv", "32", "--warps", "4"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^_fwd_out BV=32 warps=4: \d+ registers, \d+ bytes of stack, \d+ KiB shared$", r.stdout, re.M)
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "kernel_regs.py"), "--kernels", "_fwd_state",
                        "--bv", "8", "--warps", "4", "--loop"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"^_fwd_state BV=8 warps=4: .*; loop (\d+) instructions \((\d+) IMAD/IADD3/LEA, \d+ barriers, "
                  r"(\d+) HMMA\)$", r.stdout, re.M)
    assert m and int(m.group(3)) > 0 and int(m.group(1)) > int(m.group(2)) + int(m.group(3))  # the walk's products


def test_gpu_scripts_without_a_gpu_say_one_line(tmp_path):
    """benchmarks/*.py that time GPU kernels: without CUDA, exit 1 with one line, nothing written."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    root = Path(__file__).resolve().parents[1]
    for script in ("profile_layer.py", "profile_step.py", "profile_decode.py", "scaling_order.py", "scan_kernels.py",
                   "conv_kernels.py", "ncu_scan.py", "max_norm_scan.py"):
        out = tmp_path / f"{script}.json"
        args = [] if script == "ncu_scan.py" else ["--out", str(out)]  # ncu_scan.py writes nothing, ncu does
        args += ["--name", "x"] if script.endswith("_kernels.py") else []
        r = subprocess.run([sys.executable, str(root / "benchmarks" / script), *args],
                           capture_output=True, text=True, cwd=root)
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            f"{script}: no CUDA device here; it times GPU kernels, so run it on a GPU machine"], (script, r.stderr)
        assert not out.exists()


def test_ncu_stalls_summarises_a_source_page(tmp_path):
    """benchmarks/ncu_scan.py --stalls: ncu's source page (log lines, then a CSV) by stall reason,
    by opcode and by instruction; anything else is one line and exit 1."""
    root = Path(__file__).resolve().parents[1]
    page = tmp_path / "page.csv"
    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_wait", "stall_short_sb",
            "stall_wait (Not Issued)"]
    rows = [["0x10", "HMMA.16816.F32.BF16 R1, R2, R3, RZ", "6", "1", "5", "0"],
            ["0x20", "@P2 STG.E.128 desc[UR4][R6.64], R8", "3", "3", "0", "0"],
            ["0x30", "IMAD R1, R2, R3, RZ", "1", "1", "0", "0"]]
    page.write_text("==PROF== Connected to process 1\n" + "\n".join(",".join(f'"{c}"' for c in r) for r in [head] + rows))
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "ncu_scan.py"), "--stalls", str(page)],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "10 samples over 3 instructions" in r.stdout
    assert re.search(r"short_sb\s+50.0%", r.stdout) and re.search(r"wait\s+50.0%", r.stdout)
    assert "by opcode: HMMA 60.0%, STG 30.0%, IMAD 10.0%" in r.stdout  # STG past its predicate
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "ncu_scan.py"), "--stalls", str(root / "README.md")],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "no source page" in r.stderr


def test_ab_script_prepares_copies_and_refuses_unknown_modes(tmp_path):
    """benchmarks/ab.sh: `prepare` puts a branch's atlas/, benchmarks/, tests/ in a folder of its
    own; a mode it does not know is one line and exit 2."""
    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    env = {**os.environ, "AB_DIR": str(tmp_path), "OUT": str(tmp_path)}
    r = subprocess.run(["bash", "benchmarks/ab.sh", "prepare", "HEAD"], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "HEAD" / "atlas" / "memory" / "triton_scan.py").exists()
    r = subprocess.run(["bash", "benchmarks/ab.sh", "timing", "HEAD"], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["unknown: timing (prepare, kernels, conv, model, decode or scaling)"]


def test_table_marks_the_headline_mode_once():
    from atlas.bench import table
    layer = {"B": 2, "T": 8, "H": 1, "D": 4, "chunk_size": 4, "sdpa_eager_ms": 2.0, "sdpa_eager_tok_s": 8.0,
             "sdpa_captured_ms": 1.0, "sdpa_captured_tok_s": 16.0, "sdpa_mode": "eager", "sdpa_ms": 2.0, "sdpa_tok_s": 8.0}
    rows = [line for line in table({"device": "x", "dtype": "y", "layer": layer}).splitlines() if line.startswith("| sdpa")]
    assert rows == ["| sdpa_eager (headline) | 2.00 | 8 |", "| sdpa_captured | 1.00 | 16 |"]
