"""`codellm eval`: the harness on known answers, the sandbox on hostile candidates, pass@k, and whole runs through
the real server (a tiny model taught one HumanEval answer, so that scores are not all zero)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import Server, run_cli, teach_tiny

LIMITS = None


def _run_all(problems, answers, seconds=10.0):
    from codellm.eval import sandbox

    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(lambda pa: sandbox.run(pa[0].program(pa[1]), sandbox.Limits(seconds=seconds)),
                           zip(problems, answers)))


def test_canonical_solutions_score_every_problem():
    from codellm.eval import suites

    he = suites.humaneval()
    assert len(he) == 164
    assert [o.status for o in _run_all(he, [p.reference for p in he])] == ["passed"] * 164
    fim = suites.humaneval_fim()
    assert len(fim) == 328 and all(p.fim for p in fim)
    assert all(o.status == "passed" for o in _run_all(fim, [p.reference for p in fim]))
    wrong = _run_all(he[:5], ["    return None\n"] * 5)
    assert all(o.status == "failed" and o.error for o in wrong)
    from codellm.eval.run import extract_code  # a chat answer: the function restated in a fenced block

    answer = ("Here you go:\n```python\ndef has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
              + he[0].reference + "```\nIt compares every pair.")
    assert _run_all([he[0]], [extract_code(answer)])[0].status == "passed"


def test_the_sandbox_contains_hostile_candidates(tmp_path):
    import socket

    from codellm.eval import sandbox

    workdirs = lambda: set(Path(sandbox.workdir_root()).glob("codellm-eval-*"))  # noqa: E731
    before = workdirs()

    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    cases = {
        "planted bug": ("def add(a, b):\n    return a - b\nassert add(2, 2) == 4", {sandbox.FAILED}),
        "infinite loop": ("while True:\n    pass", {sandbox.TIMED_OUT}),
        "sleeper": ("import time\ntime.sleep(60)", {sandbox.TIMED_OUT}),
        "fork bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                      {sandbox.TIMED_OUT, sandbox.FAILED}),
        "10 GB": ("x = bytearray(10 * 1024 ** 3)\nassert x", {sandbox.FAILED, sandbox.CRASHED}),
        "write outside": (f"open({str(precious)!r}, 'w').write('gone')", {sandbox.FAILED}),
        "huge file": ("open('big', 'wb').write(b'x' * (200 << 20))", {sandbox.FAILED}),
    }
    if sandbox.plan().network:
        cases["network"] = (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)", {sandbox.FAILED})
    started = time.time()
    for name, (program, allowed) in cases.items():
        outcome = sandbox.run(program, sandbox.Limits(seconds=3))
        assert outcome.status in allowed, (name, outcome)
    assert time.time() - started < 60
    assert precious.read_text() == "keep"
    listener.close()
    time.sleep(0.5)
    leftover = subprocess.run(["pgrep", "-u", "nobody", "-f", "candidate.py"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""  # nothing of theirs still runs
    assert workdirs() <= before  # every working directory removed


def test_pass_at_k_matches_the_closed_form():
    from codellm.eval.passk import mean_pass_at_k, pass_at_k

    for n, c, k in [(10, 0, 1), (10, 3, 1), (10, 3, 5), (20, 19, 10), (5, 5, 5), (200, 17, 100), (1, 1, 1)]:
        closed = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert mean_pass_at_k([(4, 1), (4, 4)], 1) == pytest.approx(0.625)
    assert mean_pass_at_k([(4, 1), (1, 1)], 2) is None  # a problem with fewer than k samples


@pytest.fixture(scope="session")
def eval_home(tmp_path_factory, tiny_dir) -> Path:
    """A registry with `memorizer`: the tiny model taught to complete HumanEval/0 with its canonical solution."""
    from transformers import AutoTokenizer

    from codellm.eval import suites
    from codellm.registry import Registry
    from codellm.registry.create import create
    from codellm.registry.modelfile import Modelfile

    p = suites.humaneval()[0]
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    answer = tok(p.reference, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    out = teach_tiny(tiny_dir, tok(p.prompt)["input_ids"], answer, tmp_path_factory.mktemp("memorizer") / "model",
                     steps=300, loss_below=0.005)
    home = tmp_path_factory.mktemp("eval-home")
    create(Registry(home), "memorizer", Modelfile(from_=str(out)))
    create(Registry(home), "tiny", Modelfile(from_=str(tiny_dir)))
    return home


def _eval(home: Path, *args: str, env: dict | None = None, timeout: float = 600):
    return run_cli("eval", *args, env={"CODELLM_HOME": str(home), **(env or {})}, timeout=timeout)


def test_eval_end_to_end_through_the_server(eval_home, tmp_path):
    out = tmp_path / "run"
    r = _eval(eval_home, "memorizer", "tiny", "--suite", "humaneval", "--limit", "2", "-n", "3", "--k", "1,2",
              "--mode", "completion", "--temperature", "0", "--max-tokens", "400", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "pass@1" in r.stdout and "memorizer" in r.stdout and "tiny" in r.stdout
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 2 * 3
    assert {(x["model"], x["task_id"], x["index"]) for x in lines} == {
        (m, f"HumanEval/{t}", i) for m in ("memorizer", "tiny") for t in (0, 1) for i in range(3)}
    assert all(x["generate_s"] > 0 and x["status"] in ("passed", "failed", "timed out", "crashed") for x in lines)
    summary = json.loads((out / "summary.json").read_text())["models"]
    assert summary["memorizer"]["per_problem"]["HumanEval/0"]["passed"] == 3  # it learned that one answer
    assert summary["memorizer"]["pass_at"]["pass@1"] == pytest.approx(0.5)
    assert summary["tiny"]["pass_at"]["pass@1"] == 0.0
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_a_running_server_by_url(eval_home, tmp_path):
    srv = Server(eval_home, "--model", "memorizer")
    try:
        r = _eval(eval_home, "memorizer", "--suite", "humaneval-fim", "--limit", "2", "--url", srv.url,
                  "--max-tokens", "40", "--out", str(tmp_path / "fim"))
        assert r.returncode == 0, r.stderr
        lines = [json.loads(x) for x in (tmp_path / "fim" / "results.jsonl").read_text().splitlines()]
        assert [x["task_id"] for x in sorted(lines, key=lambda x: x["task_id"])] == ["HumanEval/0/multi", "HumanEval/0/single"]
    finally:
        srv.stop()


def test_a_killed_eval_continues_where_it_stopped(eval_home, tmp_path):
    out = tmp_path / "resumed"
    args = ["tiny", "--suite", "humaneval", "--limit", "4", "-n", "4", "--concurrency", "1", "--workers", "1",
            "--max-tokens", "24", "--out", str(out)]
    env = {**os.environ, "CODELLM_HOME": str(eval_home)}
    proc = subprocess.Popen([sys.executable, "-m", "codellm.cli.main", "eval", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = results.read_text().splitlines()
    assert 5 <= len(kept) < 16
    r = _eval(eval_home, *args)
    assert r.returncode == 0, r.stderr
    lines = results.read_text().splitlines()
    assert lines[:len(kept)] == kept or len(lines) == 16  # what was scored stays, and only the rest was sampled
    keys = [(json.loads(x)["task_id"], json.loads(x)["index"]) for x in lines]
    assert len(keys) == 16 and len(set(keys)) == 16
    r = _eval(eval_home, *args[:-2], "-n", "2", "--out", str(out))  # another configuration: not mixed in
    assert r.returncode == 1 and "another configuration" in r.stderr


def test_suites_from_files_and_the_hub(eval_home, tmp_path, hub):
    from codellm.eval import suites

    mbpp = {"task_id": 2, "prompt": "Write a function to find the shared elements from the given two lists.",
            "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
            "test_imports": [], "test_list": ["assert set(similar_elements((3, 4, 5, 6), (5, 7, 4, 10))) == set((4, 5))"]}
    apps = {"problem_id": 7, "question": "Print the sum of two integers read from input.",
            "solutions": json.dumps(["a, b = map(int, input().split())\nprint(a + b)"])}
    own = {"task_id": "mine/1", "prompt": "def double(x):\n", "tests": ["assert double(2) == 4"], "reference": "    return 2 * x\n"}
    files = {}
    for name, record in (("mbpp", mbpp), ("apps", apps), ("own", own)):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text(json.dumps(record) + "\n")
    (p,) = suites.load("mbpp", str(files["mbpp"]))
    assert _run_all([p], [mbpp["code"]])[0].status == "passed"
    assert _run_all([p], ["def similar_elements(a, b):\n    return ()"])[0].status == "failed"
    (q,) = suites.load("apps", str(files["apps"]))
    assert not q.tests and q.reference.startswith("a, b")
    (o,) = suites.load(str(files["own"]))
    assert _run_all([o], [own["reference"]])[0].status == "passed"

    r = _eval(eval_home, "tiny", "--suite", "apps", "--data", str(files["apps"]), "--max-tokens", "16",
              "--out", str(tmp_path / "apps"))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "apps" / "summary.json").read_text())["models"]["tiny"]
    assert summary["chrf"] is not None and summary["pass_at"] == {}
    # MBPP from the hub (the sanitized config's test split), through huggingface_hub
    d = tmp_path / "mbpp-repo" / "sanitized"
    d.mkdir(parents=True)
    (d / "test.jsonl").write_text(json.dumps(mbpp) + "\n")
    hub.add("google-research-datasets/mbpp", d.parent, repo_type="dataset")
    r = _eval(eval_home, "tiny", "--suite", "mbpp", "--max-tokens", "16", "--out", str(tmp_path / "mbpp"),
              env={"HF_ENDPOINT": hub.url})
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "mbpp" / "results.jsonl").read_text().splitlines()[0])["task_id"] == "Mbpp/2"


def test_train_eval_suite_records_base_and_adapter(eval_home, tmp_path):
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "input": "", "output": f"a{i}"}) + "\n" for i in range(4)))
    r = run_cli("train", "tiny", "--data", str(data), "--name", "tiny-tuned", "--max-steps", "2", "--batch-size", "2",
                "--max-len", "64", "--eval-split", "0", "--eval-suite", "humaneval", "--eval-limit", "1",
                env={"CODELLM_HOME": str(eval_home)}, timeout=600)
    assert r.returncode == 0, r.stderr
    shown = run_cli("show", "tiny-tuned", env={"CODELLM_HOME": str(eval_home)})
    assert "Evaluation (humaneval)" in shown.stdout and "pass@1" in shown.stdout, shown.stdout
    from codellm.registry import Registry
    from codellm.registry.info import describe_model

    record = describe_model(Registry(eval_home), "tiny-tuned").training["evaluation"]["humaneval"]
    assert record["base"]["samples"] == 1 and record["adapter"]["samples"] == 1
