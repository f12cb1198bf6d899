"""SGLang collector: ask a running SGLang server for its expert-distribution record every so
often and upload each dump to the placement service.

SGLang's documented endpoints: ``/start_expert_distribution_record``,
``/stop_expert_distribution_record`` and ``/dump_expert_distribution_record`` (GET or POST,
answering text). A dump is written by the SGLang server as a torch file into
``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR`` (default ``/tmp``) on its own host, and the recorder
is reset after each dump, so consecutive dumps hold disjoint traffic. In ``stat`` mode rank 0
writes ``expert_distribution_recorder_<time>.pt`` with counts summed over all ranks; in
``per_token`` mode every rank writes ``expert_distribution_recorder_<time>_<rank>.pt`` with its
own tokens. The collector therefore runs on the SGLang host and reads that directory.

Every dump is uploaded with a batch id made of its name and content hash, so a collector that
crashes after an upload and uploads the file again does not count it twice; a file is deleted
only after the service acknowledged it (``keep=True`` keeps it). A dump the service refuses
(422) is renamed ``*.rejected`` and reported, not retried forever; one the service could not be
reached for stays and is retried next cycle.

Counts are complete only if SGLang keeps every forward pass between dumps: in ``stat`` mode run
it with ``--expert-distribution-recorder-buffer-size -1`` (a circular buffer keeps only the last
passes).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from moeplace.service.client import Client, ServiceError

PREFIX = "expert_distribution_recorder_"


@dataclass
class CollectReport:
    """What one collector run did."""

    cycles: int = 0
    uploaded: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


def dump_rank(path: Path) -> str | None:
    """``None`` for a ``stat`` dump (rank 0 writes the all-rank sum), else the rank suffix."""
    stem = path.name[len(PREFIX):-len(".pt")]
    return stem.rpartition("_")[2] if "_" in stem else None


def pending_dumps(dump_dir: Path, ranks: Iterable[str] | None) -> list[Path]:
    """Dump files waiting to be uploaded, oldest name first; per-rank dumps of ``ranks`` only
    (``None``: every rank)."""
    want = None if ranks is None else set(ranks)
    out = []
    for p in sorted(dump_dir.glob(f"{PREFIX}*.pt")):
        r = dump_rank(p)
        if r is None or want is None or r in want:
            out.append(p)
    return out


def _wait_stable(p: Path, timeout: float) -> None:
    """SGLang writes the file in place: wait until its size stops changing (bounded)."""
    end = time.monotonic() + timeout
    last = -1
    while time.monotonic() < end:
        size = p.stat().st_size
        if size == last and size > 0:
            return
        last = size
        time.sleep(0.1)


def collect(sglang: str, dump_dir: str | os.PathLike[str], client: Client, deployment: str, *,
            every: float = 60.0, cycles: int | None = None, ranks: Iterable[str] | None = ("0",),
            start: bool = True, keep: bool = False, wait_s: float = 30.0,
            sglang_api_key: str | None = None,
            log: Callable[[str], None] = print) -> CollectReport:
    """Run ``cycles`` dump-and-upload cycles (``None``: until interrupted), ``every`` s apart.

    Leftover dumps in ``dump_dir`` (from a collector that stopped) are uploaded first.
    """
    import httpx

    d = Path(dump_dir)
    d.mkdir(parents=True, exist_ok=True)
    rep = CollectReport()
    headers = {"Authorization": f"Bearer {sglang_api_key}"} if sglang_api_key else {}
    with httpx.Client(base_url=sglang.rstrip("/"), headers=headers, timeout=60) as sg:

        def call(endpoint: str) -> None:
            try:
                r = sg.post(f"/{endpoint}")
            except httpx.HTTPError as exc:
                raise ServiceError(0, f"cannot reach SGLang at {sglang} ({type(exc).__name__})"
                                   ) from None
            if r.status_code >= 400:
                raise ServiceError(r.status_code, f"SGLang /{endpoint}: {r.text.strip()[:200]}")

        done: set[str] = set()  # kept dumps this run already uploaded

        def upload_pending() -> None:
            for p in pending_dumps(d, ranks):
                if p.name in done:
                    continue
                _wait_stable(p, wait_s)
                body = p.read_bytes()
                bid = f"sglang:{p.name}:{hashlib.sha256(body).hexdigest()[:16]}"
                try:
                    r = client.push_stats(deployment, body, bid)
                except ServiceError as exc:
                    if exc.status in (400, 409, 413, 422):
                        p.rename(p.with_name(p.name + ".rejected"))
                        rep.rejected.append(p.name)
                        log(f"{p.name}: refused by the service, kept as {p.name}.rejected: {exc}")
                        continue
                    rep.errors.append(str(exc))
                    log(f"{p.name}: not uploaded, retried next cycle: {exc}")
                    return
                (rep.uploaded if r["counted"] else rep.duplicates).append(p.name)
                rep.tokens += int(r["tokens"]) if r["counted"] else 0
                log(f"{p.name}: {'counted' if r['counted'] else 'already counted'}: "
                    f"{r['tokens']:,} tokens")
                if keep:
                    done.add(p.name)
                else:
                    p.unlink()

        upload_pending()
        if start:
            call("start_expert_distribution_record")
        while cycles is None or rep.cycles < cycles:
            time.sleep(every)
            before = {p.name for p in d.glob(f"{PREFIX}*.pt")}
            call("dump_expert_distribution_record")
            end = time.monotonic() + wait_s
            while not ({p.name for p in d.glob(f"{PREFIX}*.pt")} - before):
                if time.monotonic() > end:
                    rep.errors.append(f"no new dump in {d} within {wait_s:g} s")
                    log(f"no new dump appeared in {d} within {wait_s:g} s (is "
                        "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR this directory, and the "
                        "recorder enabled with --expert-distribution-recorder-mode?)")
                    break
                time.sleep(0.1)
            upload_pending()
            rep.cycles += 1
    return rep
