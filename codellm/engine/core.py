"""Continuous batching: one engine thread per loaded model runs the step loop.

Each step, the ``Scheduler`` plans (admissions and prompt chunks, then the decode batch), the
``ModelRunner`` computes, and ``outputs`` turns the sampled tokens into text for each request's
``sink``, a callable run on the engine thread; the server turns those into SSE/NDJSON on its event loop.
Sequences join and leave at token boundaries; a cancelled one (client gone) gives its row and blocks back
before the next step, and a step that fails is retried one sequence at a time, so that only the one at
fault fails.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from typing import Callable

import torch

from codellm.engine import blocks, drafter, fusion, grammar, memory, outputs, sampling, speculation, steplog, telemetry
from codellm.engine.client import Admission, Handle
from codellm.engine.drafter import Drafter
from codellm.engine.detok import IncrementalDetokenizer, StopMatcher, pieces_of
from codellm.engine.loader import LoadedModel
from codellm.engine.outputs import Output, Sink, Stats
from codellm.engine.runner import Launched, ModelRunner, kv_shape
from codellm.engine.sampling import SamplingParams, TokenLogprob, generator
from codellm.engine.speculation import SpeculativeConfig
from codellm.engine.scheduler import DecodePlan, PrefillPlan, Scheduler
from codellm.engine.sequence import Sequence, constraint, stop_ids

log = logging.getLogger("codellm.engine")


def default_slots(cuda: bool) -> int:
    """Sequences decoded together when not set: KV memory is paged, so many short ones fit where few long ones do."""
    return 256 if cuda else 8


PREFILL_FLOPS = 2e13  # prompt work one GPU step takes when not set: about 30 ms of an H100


def default_prefill_chunk(cuda: bool, parameters: int) -> int:
    """Prompt tokens one step prefills when not set. Every stream decoding beside a prefill waits for it, and a burst
    of prompts gets its first tokens a step's worth at a time, so a step's prefill is bounded by its compute (two
    flops a parameter a token): 8192 tokens of a 1B model, 4096 of a 3B, 2048 of a 7-8B (a power of two, from 2048 to
    8192). A CPU takes 512."""
    if not cuda:
        return 512
    tokens = PREFILL_FLOPS / (2 * max(parameters, 1))
    return min(8192, max(2048, 2 ** round(math.log2(tokens))))


def parameter_count(model: torch.nn.Module) -> int:
    """Weights in the model, counting a 4-bit parameter (two to a byte) twice."""
    return sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())


class Engine(Admission):
    def __init__(self, lm: LoadedModel, *, slots: int | None = None, max_queue: int = 256, prefill_chunk: int | None = None,
                 cuda_graphs: bool = True, compile: bool = False, compile_prefill: bool = False, overlap: bool | None = None, fuse: bool = True,
                 kv_cache_memory: int | None = None, kv_fit: bool = False, block_size: int = 16,
                 prefix_caching: bool = True, mixed: bool = False,
                 speculative: SpeculativeConfig | None = None, draft: LoadedModel | None = None,
                 source: Callable[[float], None] | None = None, ranks=None):
        self.lm = lm
        # drafts from prompt lookup or from a draft model (``draft``), checked in one forward (``speculation``)
        self.speculative = speculative
        # decoding sequences ride in a prefilling step's forward (one forward reads the weights once), where the
        # runner can run them together and every one of them is pipelined (``_ride``)
        self.mixed = mixed and speculative is None
        self._pace = speculation.Pace()
        self._paced: tuple[bool, int] | None = None  # this step's decode: (speculated, batch size), to time it
        self._step_end = 0.0
        # where new work comes from besides ``submit`` from other threads: called on the engine thread with how long
        # it may wait (an engine process reads its pipe there, so no reader thread has to win the GIL from this loop)
        self._source = source
        if fuse:  # q/k/v and gate/up as one GEMM each in engine steps (no extra memory)
            fusion.fuse(lm.model)
        cuda = lm.device.type == "cuda"
        contexts, slots = slots, slots or default_slots(cuda)
        layers, kv_heads, head_dim = kv_shape(lm.model)
        per_token = memory.kv_bytes_per_token(layers, kv_heads, head_dim, lm.dtype.itemsize)
        tokens = memory.kv_tokens(cuda, lm.max_len, kv_cache_memory, per_token, block_size, slots=contexts)
        drafting = speculative is not None and speculative.method == "draft"
        if drafting and draft is None:
            raise ValueError("draft-model speculation needs the draft model")
        # a default pool (``kv_fit``: one the server already cut to fit) is cut to what this device has free now
        if cuda and (kv_cache_memory is None or kv_fit):
            both = per_token  # (a draft model keeps a cache of as many blocks)
            if drafting:
                both += memory.kv_bytes_per_token(*kv_shape(draft.model), draft.dtype.itemsize)
            tokens = memory.fit_on_device(lm.device, tokens, both, lm.max_len, block_size)
        self.pool = blocks.BlockPool(tokens // block_size, block_size, caching=prefix_caching)
        verify_rows = speculative.verify_rows if speculative is not None else 0
        verify_run = speculative.verify_run if speculative is not None else 1
        self.runner = ModelRunner(lm, blocks=self.pool.num_blocks, block_size=block_size, rows=slots,
                                  layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                  cuda_graphs=cuda_graphs, compile=compile, compile_prefill=compile_prefill,
                                  verify_rows=verify_rows, verify_run=verify_run, mixed=self.mixed, ranks=ranks)
        if ranks is not None:  # tensor parallelism: ``lm``'s model is rank 0's shard (``sharding``)
            ranks.setup(self.runner.cache)  # the other ranks size their caches alike
        self.drafter: Drafter | None = None
        if drafting:
            drafter.check_vocabulary(lm, draft)
            self.drafter = Drafter(draft, pool=self.pool, rows=slots, verify_rows=verify_rows, verify_run=verify_run,
                                   cuda_graphs=cuda_graphs, compile=compile)
        # prompt tokens per step (``default_prefill_chunk``): streams already decoding wait for each step's prefill
        self.scheduler = Scheduler(self.pool, slots, prefill_chunk or default_prefill_chunk(cuda, parameter_count(lm.model)))
        # greedy steps pick their tokens in the step and leave them on the device (see _decode_one), read a step late
        # while the device runs the next one where it runs asynchronously (a GPU; None: there only, True: everywhere);
        # a CPU runs the step in the calling thread, and reading late there would only delay every token by a step
        self.overlap = overlap is not False
        self.read_late = cuda if overlap is None else bool(overlap)
        self._launched: list[Launched] = []  # tokens on the device the host has not read, oldest first
        # a speculating step's tokens, in their sequences but not yet told to their requests: reading late, that host
        # work (detokenizing, stop strings, delivery) runs while the device checks the next step's drafts
        self._untold: list[tuple[Sequence, list[int], int]] = []
        self._init_admission(max_queue)
        pieces_of(lm.tokenizer)  # the token text table, at load rather than on the first request
        self.stats = Stats(kv_blocks=self.pool.num_blocks)
        self._steplog = steplog.from_env(lm.name)  # CODELLM_STEP_LOG: a line per step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self.step_lock = threading.Lock()  # held while a step runs: hold it to change the model safely
        self._ready = threading.Event()  # set once decode graphs are captured (compiled): loading ends there
        self._thread = threading.Thread(target=self._loop, name=f"engine:{lm.name}", daemon=True)
        self._thread.start()
        self._ready.wait()

    # -- the client interface (any thread) -------------------------------------------------
    @property
    def slots(self) -> int:
        return self.runner.cache.slots

    @property
    def kv_bytes(self) -> int:
        return self.runner.cache.nbytes + (self.drafter.kv_bytes if self.drafter else 0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def active(self) -> int:
        return self.slots - len(self.scheduler.free_slots)

    def submit(self, prompt: list[int], params: SamplingParams, sink: Sink, *, n: int = 1,
               prompt_logprobs: bool = False, lm: LoadedModel | None = None) -> Handle:
        """Queue ``n`` sequences for ``prompt``. ``lm`` is the model view asked for (its tokenizer, EOS ids and
        adapter) when several models share this engine's weights; default: the engine's own."""
        lm = lm or self.lm
        self._reserve(prompt, n, lm, params)
        room = min(lm.max_len, self.lm.max_len) - len(prompt)
        max_new = min(params.max_tokens, room) if params.max_tokens is not None else room
        try:
            seqs = self._sequences(prompt, params, telemetry.timed(sink, lm.name) if self.timed else sink, n, prompt_logprobs, lm, max_new)
        except BaseException:
            self._released(n)
            raise
        self._inbox.put(("add", seqs))
        return Handle(self, seqs)

    def _sequences(self, prompt, params, sink, n, prompt_logprobs, lm, max_new) -> list[Sequence]:
        ids, strings = stop_ids(lm.tokenizer, lm.eos_ids, params)
        return [
            Sequence(
                index=i, prompt=list(prompt), params=params, sink=sink, max_new=max(0, max_new), stop_ids=ids,
                detok=IncrementalDetokenizer(lm.tokenizer, prompt, params.skip_special_tokens), stops=StopMatcher(strings),
                generator=generator(params.seed, i, self.lm.device),
                want_prompt_logprobs=prompt_logprobs and i == 0,
                constraint=constraint(params, lm.tokenizer, lm.eos_ids), adapter=lm.adapter,
                speculating=params.speculative,
            )
            for i in range(n)
        ]

    def cancel(self, handle: Handle) -> None:
        self._inbox.put(("cancel", handle.seqs))

    def embed(self, lm: LoadedModel, texts: list[str], *, truncate: bool = True) -> tuple[list[list[float]], int]:
        """Mean-pooled embeddings from these weights (``embeddings.embed``), beside the step loop."""
        from codellm.engine.embeddings import embed

        self._whole("embeddings")
        return embed(lm, texts, truncate=truncate)

    def _whole(self, what: str) -> None:
        """Refuse what needs the whole model in this process (a forward the other ranks would not join)."""
        if self.runner.ranks is not None:
            from codellm.errors import InvalidRequest

            raise InvalidRequest(f"{what} are not served by a tensor-parallel engine ({self.runner.ranks.world} ranks)")

    def attach_adapter(self, registry, entry) -> tuple[object, str]:
        """Put ``entry``'s LoRA adapter on the weights between two steps; (the model now, the adapter's name)."""
        from codellm.engine import loader

        self._whole("LoRA adapters")
        with self.step_lock:
            model, adapter = loader.attach_adapter(registry, self.lm.model, entry)
            self.lm.model = model
            self._complete()  # capturing graphs again overwrites each row's last token on the device: read it first
            self.runner.use_adapters(model, adapter)
            self.stats.adapters = len(model.peft_config)
        return model, adapter

    def detach_adapter(self, adapter: str):
        """(See ``EngineClient``.) Returns the model now: the last adapter gone, the bare base again."""
        from codellm.errors import InvalidRequest

        with self.step_lock:
            model = self.lm.model
            if adapter not in (getattr(model, "peft_config", None) or {}):
                return model
            if self.scheduler.uses(adapter):
                raise InvalidRequest(f"adapter {adapter} is in use", code="adapter_in_use")
            self._complete()
            if len(model.peft_config) == 1:
                model = model.unload()  # the LoRA layers out again, the base weights untouched
            else:
                model.delete_adapter(adapter)
            self.lm.model = model
            self.runner.use_adapters(model, adapter)
            self.stats.adapters = len(getattr(model, "peft_config", None) or {})
        return model

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=10)
        if self.runner.ranks is not None:
            self.runner.ranks.stop()

    # -- the loop (engine thread) ----------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            with self.step_lock:
                self.runner.warmup()
                if self.drafter is not None:
                    self.drafter.warmup()
            if self.lm.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.lm.device)
                log.info("device memory after warmup: %s allocated, %s reserved, %s of %s free",
                         *(memory.human(n) for n in (torch.cuda.memory_allocated(self.lm.device),
                                                     torch.cuda.memory_reserved(self.lm.device), free, total)))
        finally:
            self._ready.set()
        while not self._stop.is_set():
            try:
                self._drain(block=self.scheduler.idle)
                if self._stop.is_set():
                    break
                with self.step_lock:
                    self._step()
            except Exception:  # never let one bad sequence kill the engine, or the others in its batch
                log.exception("engine step failed; stepping its sequences one at a time to find the one at fault")
                self._isolate()
        self._tell()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, "cancelled")
        if self._steplog is not None:
            self._steplog.close()

    def _step(self, admit: bool = True) -> None:
        """A step, timed where it decoded: how fast steps that speculate go, against steps that do not, decides
        whether the next ones do (``speculation.Pace``). Steps that prefill too are timed: prompts arrive as streams
        end, so each way meets as many per token, and a way that cannot overlap a prefill with its own forward
        (a speculating step waits for the prompt's first token) pays for it there."""
        tokens, self._paced = self.stats.decode_tokens, None
        self._run_step(admit)
        now = time.perf_counter()
        if self._paced is not None:
            timed = now - self._step_end < 1.0  # (not the first step after idling)
            self._pace.record(*self._paced, self.stats.decode_tokens - tokens, now - self._step_end if timed else None)
        self._step_end = now

    def _run_step(self, admit: bool) -> None:
        untold = self._untold  # (a step that verifies drafts tells these during its forward and leaves its own)
        begun = time.perf_counter()
        riding = self.mixed and self.overlap and self.runner.can_ride
        plan = self.scheduler.schedule_prefill(admit)
        self._set_rows(plan.rows)
        if riding and plan.chunks and not plan.alone:
            prefilled, decoded = self._ride(plan)
        else:
            self._prefill(plan)
            prefilled = time.perf_counter()
            decode = self._decode_plan()
            self._decode(decode.batch)
            decoded = len(decode.batch)
        if self._steplog is not None and (plan.rows or plan.chunks or plan.alone or decoded):  # (not idle ones)
            self._steplog.record(begun, len(plan.rows), plan.chunks + plan.alone, decoded, prefilled)
        if untold and self._untold is untold:  # no forward to hide them behind: told now, a step late at most
            self._tell()
        self.stats.kv_used = self.pool.used
        self.stats.preempted = self.scheduler.preempted
        self.stats.prefix_queries, self.stats.prefix_hits = self.scheduler.prefix_queries, self.scheduler.prefix_hits

    def _set_rows(self, seqs: list[Sequence]) -> None:
        self.runner.set_rows(seqs)
        if self.drafter is not None:
            self.drafter.set_rows(seqs)

    def _isolate(self) -> None:
        """After a failed step: every running sequence takes one step alone, and only those that fail alone are
        finished with an error; the others go on as before. The failed step's tokens still on the device are
        dropped, and each of those sequences computes that position again (writing the same cache entries); a prompt
        whose first token was lost prefills its last position again."""
        self._launched = []
        untold, self._untold = self._untold, []
        for item in untold:  # (the tokens are in their sequences already)
            if not item[0].finished:
                try:
                    self._tell_runs([item])
                except Exception as exc:
                    self._finish(item[0], "error", error=f"{type(exc).__name__}: {exc}")
        running = self.scheduler.running
        for seq in running:
            seq.inflight = 0
            seq.draft_cached = 0  # the draft computes it all again, should it speculate
            if not seq.generated and not seq.prefilling:
                seq.cached = seq.target - 1
        for seq in list(running):
            if seq.finished:
                continue
            everyone, self.scheduler.running, failure = self.scheduler.running, [seq], None
            try:
                with self.step_lock:
                    self._step(admit=False)
                    self._complete()
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
                self._launched = []
                seq.inflight = 0
            finally:
                alone = self.scheduler.running
                self.scheduler.running = [s for s in everyone if not s.finished and (s is not seq or s in alone)]
            if failure is not None:
                log.error("sequence %d failed on its own and is aborted: %s", seq.id, failure)
                self._finish(seq, "error", error=failure)

    def _drain(self, block: bool) -> None:
        if self._source is not None:
            self._source(0.5 if block and self._inbox.empty() else 0.0)
            block = False
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, seqs = item
            if kind == "add":
                self.scheduler.add(seqs)
            elif kind == "cancel":
                for seq in seqs:
                    seq.cancelled = True
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        for seq in self.scheduler.cancelled():
            self._finish(seq, "cancelled")

    def _prefill(self, plan: PrefillPlan) -> None:
        if self.drafter is not None:  # the draft's cache holds the prompts too
            self.drafter.prefill(plan.alone + plan.chunks)
        for chunk in plan.alone:  # prompt logprobs: every position's logits, a forward of its own
            logits = self.runner.prefill_alone(chunk)
            self._prefilled([chunk])
            if logits is not None:
                self._after_prefill([chunk[0]], logits)
        if plan.chunks:
            seqs, logits = self.runner.prefill(plan.chunks)
            self._prefilled(plan.chunks)
            if seqs:
                self._after_prefill(seqs, logits)

    def _decode_plan(self) -> DecodePlan:
        """The step's decode batch, with the blocks its next tokens need (their rows written)."""
        decode = self.scheduler.schedule_decode()
        if decode.preempted:
            self._complete()  # a preempted sequence resumes from every token it has, the one in flight included
        self._set_rows(decode.rows)
        return decode

    def _ride(self, plan: PrefillPlan) -> tuple[float, int]:
        """A prefilling step whose decoding sequences ride in the prefill's forward: each one's next token a
        one-token row beside the prompt chunks, picked on the device and read a step late, as ``_decode_one``'s
        are. Their blocks are given first (a sequence preempted for them drops its chunk); prompts the step
        completes start decoding in the next step. Where one of them is not pipelined, they decode after the
        prefill, as in any other step. Returns when the prefill was launched, and how many sequences decoded."""
        decode = self._decode_plan()
        if decode.preempted:
            plan.chunks = [c for c in plan.chunks if c[0].chain is not None]
        batch = [s for s in decode.batch if s.decodable]
        riders = batch if all(s.pipelined and len(s.generated) + s.inflight < s.max_new for s in batch) else []
        earlier, self._launched = self._launched, []  # the previous step's tokens, read while this one runs
        if plan.chunks:
            seqs, logits, launched = self.runner.prefill_riding(plan.chunks, riders)
            self._prefilled(plan.chunks)
            if seqs:
                self._after_prefill(seqs, logits)
        else:
            launched = self.runner.launch(riders) if riders else None
        prefilled = time.perf_counter()
        now, self._launched = self._launched, earlier
        self._complete()
        self._launched = now
        if riders:
            self._counted(riders)
            self.stats.rides += len(riders) if plan.chunks else 0
            self._launched.append(launched)
        elif batch:
            self._decode(batch)
        if not self.read_late:
            self._complete()
        return prefilled, len(batch)

    def _prefilled(self, chunks) -> None:
        self.scheduler.prefilled(chunks)
        self.stats.prefill_tokens += sum(end - start for _, start, end in chunks)

    def _after_prefill(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Prompts fully in the cache: sample their first tokens (or finish those asked for none). A sequence
        computed again after a preemption already has its next token. First tokens that are the plain argmax stay
        on the device, read with the next decode step's (``_decode_one``), which they feed."""
        keep = [i for i, seq in enumerate(seqs) if seq.max_new > 0 and not seq.generated]
        for seq in seqs:
            if seq.max_new == 0:
                self._finish(seq, "length")
        if keep:
            kept, logits = [seqs[i] for i in keep], logits if len(keep) == len(seqs) else logits[keep]
            if self.overlap and all(s.pipelined for s in kept):
                self._launched.append(self.runner.launch_first(kept, logits))
            else:
                self._sample(kept, logits)

    def _decode(self, batch: list[Sequence]) -> None:
        if self.speculative is not None and len(batch) <= self.speculative.max_batch and \
                any(s.speculating for s in batch):
            self._paced = (self._pace.choose(len(batch)), len(batch))
        if self._paced and self._paced[0]:
            self._complete()  # drafts look at every token so far (so steps are not overlapped while speculating)
            batch = [s for s in batch if s.decodable]
            drafted = self._drafts(batch)
            if drafted:  # the sequences that found no drafts ride along with none: one forward for the step
                checked = {id(seq) for seq, _ in drafted}
                riders = [(s, []) for s in batch if s.pipelined and id(s) not in checked]
                self._verify(drafted + riders)
                checked.update(id(seq) for seq, _ in riders)
                batch = [s for s in batch if s.decodable and id(s) not in checked]
                if not batch:
                    return
        self._decode_one(batch)

    def _drafts(self, batch: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """The sequences that speculate this step, with their drafts (and the KV blocks those need)."""
        cfg = self.speculative
        wanted = []
        for seq in batch:
            room = seq.max_new - len(seq.generated) - 1  # the token the model adds after the drafts counts too
            if room <= 0 or not seq.speculating or seq.constraint is not None or seq.params.logprobs is not None:
                continue
            seq.spec_steps += 1
            if seq.spec_steps > cfg.warmup and seq.accepted < cfg.min_gain * seq.spec_steps:
                seq.speculating = False  # too few drafts found or kept to pay for steps that cannot overlap
                continue
            wanted.append((seq, min(cfg.num_tokens, room)))
        if self.drafter is None:
            proposed = [(seq, speculation.propose(seq.packed(), k, cfg.ngram_max, cfg.ngram_min)) for seq, k in wanted]
        else:  # the draft model writes keys as far as it drafts: the blocks first
            wanted = [(seq, k) for seq, k in wanted if self._extend(seq, seq.length + k)]
            if not wanted:
                return []
            proposed = list(zip([seq for seq, _ in wanted], self.drafter.propose(wanted)))
        return [(seq, drafts) for seq, drafts in proposed if drafts and self._extend(seq, seq.length + len(drafts))]

    def _extend(self, seq: Sequence, tokens: int) -> bool:
        """``seq``'s blocks made to cover ``tokens`` positions (False: the pool is out of them), its table row set
        again where that took a block."""
        before = len(seq.chain.blocks)
        if not self.pool.extend(seq.chain, tokens):
            return False
        if len(seq.chain.blocks) != before:
            self._set_rows([seq])
        return True

    def _verify(self, drafted: list[tuple[Sequence, list[int]]]) -> None:
        """One forward over every drafted sequence's drafts (and sequences with none, decoded in the same pass);
        each keeps what the model agrees with (``accept``) and one token more (``_take_runs``)."""
        logits, argmax = self.runner.verify(
            [(seq, [seq.generated[-1], *drafts], seq.length - 1) for seq, drafts in drafted])
        self.stats.steps += 1
        self._tell()  # the previous step's news, while the device runs this one
        best = argmax.tolist() if any(seq.params.plain_greedy for seq, _ in drafted) else None  # one wait for all
        at, runs = 0, []
        for seq, drafts in drafted:
            n = len(drafts) + 1
            if seq.finished:  # a stop string in what was just told: this row is dropped
                at += n
                continue
            known = seq.length
            if seq.params.plain_greedy:
                verdict = speculation.keep_agreeing(drafts, best[at:at + n])
            else:
                histories = [seq.generated + drafts[:j] for j in range(n)]
                verdict = speculation.accept(drafts, seq.params.greedy,
                                             sampling.choices(logits[at:at + n], seq.params, histories), seq.generator)
            at += n
            if drafts:
                if self.drafter is not None:
                    self.drafter.kept(seq, known, verdict.accepted)
                seq.drafted += len(drafts)
                seq.accepted += verdict.accepted
                self.stats.spec_drafts += 1
                self.stats.spec_draft_tokens += len(drafts)
                self.stats.spec_accepted += verdict.accepted
            runs.append((seq, verdict.tokens))
        taken = self._take_runs(runs)
        if self.read_late:
            self._untold = taken
        else:
            self._tell_runs(taken)

    def _decode_one(self, batch: list[Sequence]) -> None:
        """One decode step for ``batch``. When all of it wants the plain argmax, the step's tokens stay on the
        device and the host reads them one step later, while the device runs the next step: detokenization, stop
        checks and HTTP work overlap the forward pass. A sequence that stopped is then decoded one step too many,
        and that token is dropped. Where the step runs in this thread (a CPU) they are read as soon as it returns."""
        if not self.read_late:  # (prompts' first tokens, left on the device by the prefill, are read first)
            self._complete()
        batch = [s for s in batch if s.decodable]  # (reading the tokens in flight may have finished some)
        piped = [s for s in batch if len(s.generated) + s.inflight < s.max_new]
        if not piped or not self.overlap or not all(s.pipelined for s in piped):
            self._complete()  # the host needs every token so far
            batch = [s for s in batch if s.decodable]
            if batch:
                logits = self.runner.decode(batch)
                self._counted(batch)
                self._sample(batch, logits)
            return
        launched = self.runner.launch(piped)
        self._counted(piped)
        self._complete()  # the previous step's tokens (and prompts' first ones), read while the device runs this one
        self._launched.append(launched)
        if not self.read_late:  # the step ran here and now: what it picked is read at once
            self._complete()

    def _counted(self, batch: list[Sequence]) -> None:
        self.stats.steps += 1
        self.stats.decode_tokens += len(batch)
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1

    def _complete(self) -> None:
        """Read and emit every token still on the device, oldest first."""
        while self._launched:
            launched = self._launched.pop(0)
            live = self.runner.read(launched)
            if launched.decoded:
                self.stats.decode_tokens -= len(launched.rows) - len(live)  # rows decoded past a stop are not output
            if live:
                self._emit([s for s, _ in live], [t for _, t in live], [None] * len(live))

    def _sample(self, batch: list[Sequence], logits: torch.Tensor) -> None:
        constraints = [s.constraint for s in batch]
        if any(constraints):  # tokens the grammars do not allow next cannot be sampled
            grammar.mask(constraints, logits)
        tokens, infos = self.runner.sample(batch, logits)
        for seq, token in zip(batch, tokens):
            if seq.constraint is not None:
                seq.constraint.accept(token)
        self._emit(batch, tokens, infos)

    def _emit(self, batch: list[Sequence], tokens: list[int], infos: list[TokenLogprob | None]) -> None:
        self._tell()  # (what is still untold came first)
        for seq, out in zip(batch, self._outputs(batch, tokens, infos)):
            self._deliver(seq, out)

    def _take_runs(self, runs: list[tuple[Sequence, list[int]]]) -> list[tuple[Sequence, list[int], int]]:
        """Several tokens for each sequence (a check's verdicts) appended to it, up to a stop id and within its token
        limit: what the next step drafts from. (sequence, tokens, how many it had before) for ``_tell_runs``; one that
        took its last token is ``ending``, out of the next steps, until told."""
        taken = []
        for seq, tokens in runs:
            before = len(seq.generated)
            stop = next((i + 1 for i, t in enumerate(tokens) if t in seq.stop_ids), len(tokens))
            tokens = tokens[:min(stop, seq.max_new - before)]
            if not tokens:
                continue
            for token in tokens:
                seq.generated.append(token)
                self.scheduler.appended(seq)
            seq.ending = len(seq.generated) >= seq.max_new or tokens[-1] in seq.stop_ids
            self.stats.decode_tokens += len(tokens)
            taken.append((seq, tokens, before))
        return taken

    def _tell_runs(self, taken: list[tuple[Sequence, list[int], int]]) -> None:
        """What taken tokens say, one position at a time across all the sequences, so that each position is one batched
        pass; a stop string ends a sequence where it falls (its later tokens dropped), and each sequence hears one
        output for its tokens together."""
        merged: dict[int, tuple[Sequence, Output]] = {}
        for j in range(max((len(tokens) for _, tokens, _ in taken), default=0)):
            batch = [(seq, tokens[j], before + j + 1) for seq, tokens, before in taken if j < len(tokens) and not
                     seq.finished and not (id(seq) in merged and merged[id(seq)][1].finish_reason is not None)]
            if not batch:
                break
            seqs = [seq for seq, _, _ in batch]
            outs = outputs.process(seqs, [t for _, t, _ in batch], [None] * len(seqs), [c for _, _, c in batch])
            for (seq, _, count), out in zip(batch, outs):
                merged[id(seq)] = (seq, outputs.merge(merged[id(seq)][1], out) if id(seq) in merged else out)
                if out.finish_reason is not None and count < len(seq.generated):  # a stop string inside the run
                    self.stats.decode_tokens -= len(seq.generated) - count
                    seq.truncate(count)
        for seq, out in merged.values():
            self._deliver(seq, out)

    def _tell(self) -> None:
        if self._untold:
            taken, self._untold = self._untold, []
            self._tell_runs(taken)

    def _outputs(self, batch: list[Sequence], tokens: list[int], infos: list[TokenLogprob | None]) -> list[Output]:
        for seq, token in zip(batch, tokens):
            seq.generated.append(token)
            self.scheduler.appended(seq)
        return outputs.process(batch, tokens, infos)

    def _deliver(self, seq: Sequence, out: Output) -> None:
        if out.finish_reason is not None:
            self._finish(seq, out.finish_reason, out)
        else:
            seq.sink(out)

    def _finish(self, seq: Sequence, reason: str, out: Output | None = None, error: str | None = None) -> None:
        if seq.finished:
            return
        self.scheduler.finish(seq)
        self._released()
        if reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.finished += 1
        out = out or outputs.final(seq, reason, error)
        try:
            seq.sink(out)
        except Exception:  # a sink must never break the loop
            log.exception("sink failed")
