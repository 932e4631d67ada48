"""One realm run on simulated time, driving the node's own market cores.

The simulator does not re-implement the market. Each query goes through the
same pure cores as the live broker:

* **price** — :class:`node.pricing.PriceBook` quotes the query on arrival
  (``now_s`` = simulated time); the quote is what the user pays and what the
  worker earns (the system takes no cut);
* **queue** — :class:`node.fairqueue.FairQueue` (fair across payers, bounded,
  deadlines): a full queue refuses the query, an expired entry is refunded;
* **selection** — :func:`node.selection.select` + :func:`next_attempt` rank
  the *idle* workers for the query at the head of the queue (peak thresholds,
  daily hours, blacklist, staleness, tried workers all apply); when none may
  take it, it waits for a worker to free up;
* **health** — :mod:`node.health` transitions: a completed query is a
  success; a worker that dies is probed every ``probe_interval_s`` and each
  unanswered probe is a worker fault, until it is blacklisted (unless
  imagine-exempt); its first answered probe brings it back.

**Latency fed to the PriceBook**: for each completed query, at its completion
time, ``latency = queue wait + service time`` = completion − submission. The
wait includes any time lost on a worker that died mid-query.

Modelling choices (stated, not hidden): a worker runs one query at a time and
the realm's single queue holds work until a worker is idle, so the BUSY tier
of selection (hand work to a busy base worker's own backlog) is not used;
the queue is served strictly from its head (the head waits when no idle
worker may take it, e.g. its price is below every idle peaking worker's
threshold); ads are continuous (an up worker is always fresh, a dead one
goes stale 30 s after it died); a dead worker's running query is retried on
another worker first (up to ``max_attempts`` in all), else refunded.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from node.fairqueue import FairQueue, QueueFull
from node.health import Fault, FaultKind, HealthPolicy, WorkerHealth, is_fresh, on_ad, on_fault, on_success
from node.pricing import LatencyTracker, PriceBook, Quote
from node.selection import Candidate, Exhausted, GiveUp, Request, exclusion_reason, next_attempt, select
from node.sim.events import Event, EventLoop
from node.sim.model import DAY_S, Arrival, Scenario, WorkerClass, poisson_arrivals

SERVED = "served"
REFUSED = "refused"  # queue full
EXPIRED = "expired"  # waited past the queue deadline, refunded
FAILED = "failed"  # retries exhausted, refunded
OPEN = "open"  # still queued or running when the run ended


@dataclass
class Job:
    """One query's life in the simulated realm."""

    query_id: str
    query_type: str
    payer: str
    arrival_s: float
    quote: Quote
    outcome: str = OPEN
    failed: list[str] = field(default_factory=list)
    start_s: float | None = None
    end_s: float | None = None
    worker_id: str | None = None
    worker_class: str | None = None

    @property
    def wait_s(self) -> float | None:
        return None if self.start_s is None else self.start_s - self.arrival_s


@dataclass
class SimWorker:
    """A worker's state; counters are totals over the run."""

    worker_id: str
    cls: WorkerClass
    health: WorkerHealth
    threshold_units: dict[str, int]
    up: bool = True
    job: Job | None = None
    job_started_s: float = 0.0
    completion: Event | None = None
    daily_used_s: float = 0.0
    busy_s: float = 0.0
    earned_units: int = 0
    served: int = 0
    failures: int = 0
    down_s: float = 0.0
    down_since_s: float = 0.0
    capabilities: frozenset[str] = frozenset()
    daily_limit_s: float | None = None
    _candidate_key: tuple = ()
    _candidate: Candidate | None = None

    def __post_init__(self) -> None:
        self.capabilities = self.cls.capabilities
        self.daily_limit_s = None if self.cls.daily_limit_h is None else self.cls.daily_limit_h * 3600.0

    def candidate(self, now_s: float, policy: HealthPolicy) -> Candidate:
        """What selection sees now. An up worker advertises continuously, so it is fresh;
        a dead one stops, and goes stale ``policy.stale_after_s`` after it died."""
        fresh = self.up or is_fresh(self.health, now_s, policy)
        key = (self.health.score, self.health.blacklisted, fresh, self.job is not None, self.daily_used_s)
        if key != self._candidate_key:  # Candidate is immutable: rebuild only when the worker changed
            self._candidate_key = key
            self._candidate = Candidate(
                worker_id=self.worker_id, capabilities=self.capabilities, health=self.health.score,
                blacklisted=self.health.blacklisted, fresh=fresh, busy=self.job is not None,
                peak_threshold_units=self.threshold_units, daily_used_s=self.daily_used_s,
                daily_limit_s=self.daily_limit_s,
            )
        return self._candidate


@dataclass(frozen=True)
class Sample:
    """The realm every ``sample_interval_s``: queue depth, quotes and supply per type.

    ``active[type]``: workers up and selectable for a query of that type at
    its current price (peaking workers count once the price reaches them).
    """

    t_s: float
    depth: int
    busy: int
    quotes: dict[str, Quote]
    active: dict[str, int]


@dataclass
class SimResult:
    """Everything a run produced; :mod:`node.sim.report` turns it into figures."""

    scenario: Scenario
    seed: int
    jobs: list[Job]
    workers: list[SimWorker]
    samples: list[Sample]
    latency_log: list[tuple[str, float, float]]  # (type, latency_s, at_s) exactly as fed to the PriceBook
    events_run: int


class Realm:
    """Build with a scenario and a seed, then :meth:`run`. One run per instance."""

    def __init__(self, scenario: Scenario, seed: int = 0, arrivals: Iterable[Arrival] | None = None) -> None:
        self.scenario = scenario
        self.seed = seed
        self.loop = EventLoop()
        self.policy = HealthPolicy(no_blacklist_imagine=scenario.no_blacklist_imagine)
        tracker = LatencyTracker(scenario.latency_samples, scenario.latency_max_age_s, scenario.baselines_s)
        self.book = PriceBook(scenario.baselines_s, tracker=tracker)
        self.queue: FairQueue[Job] = FairQueue(scenario.queue_max, scenario.queue_timeout_s)
        self.retry: deque[Job] = deque()
        self._quotes: dict[str, Quote] = {}
        self._service_rng = random.Random(f"{seed}:service")
        self._fail_rng = random.Random(f"{seed}:failures")
        if arrivals is None:
            arrivals = poisson_arrivals(scenario.demand, random.Random(f"{seed}:arrivals"), scenario.payers)
        self._arrivals: Iterator[Arrival] = iter(arrivals)
        self.workers: list[SimWorker] = []
        for cls in scenario.workers:
            for i in range(cls.count):
                serves_imagine = "imagine" in cls.capabilities
                health = WorkerHealth.new(self.policy, serves_imagine=serves_imagine, now_s=0.0)
                self.workers.append(SimWorker(f"{cls.name}-{i:02d}", cls, health, cls.threshold_units()))
        self._workers_by_id = {w.worker_id: w for w in self.workers}
        self.jobs: list[Job] = []
        self.samples: list[Sample] = []
        self.latency_log: list[tuple[str, float, float]] = []
        self._ran = False

    # -- running ------------------------------------------------------------------

    def run(self) -> SimResult:
        """Simulate ``scenario.days`` days; returns the records (call once)."""
        if self._ran:
            raise RuntimeError("a Realm runs once; build a new one")
        self._ran = True
        end_s = self.scenario.duration_s
        self._schedule_next_arrival()
        for w in self.workers:
            self._schedule_failure(w)
        day = DAY_S
        while day < end_s:
            self.loop.schedule(day, self._new_day)
            day += DAY_S
        self.loop.schedule(0.0, self._sample)
        self.loop.run_until(end_s)
        for w in self.workers:  # account for work and downtime still in progress at the end
            if w.job is not None:
                w.busy_s += end_s - w.job_started_s
            if not w.up:
                w.down_s += end_s - w.down_since_s
        return SimResult(self.scenario, self.seed, self.jobs, self.workers, self.samples,
                         self.latency_log, self.loop.events_run)

    def _schedule_next_arrival(self) -> None:
        nxt = next(self._arrivals, None)
        if nxt is not None and nxt.at_s < self.scenario.duration_s:
            self.loop.schedule(max(nxt.at_s, self.loop.now_s), lambda a=nxt: self._arrive(a))

    def _arrive(self, arrival: Arrival) -> None:
        now = self.loop.now_s
        quote = self._quote(arrival.query_type, now)
        job = Job(f"q{len(self.jobs)}", arrival.query_type, arrival.payer, now, quote)
        self.jobs.append(job)
        expired = self._expire(now)
        behind = len(self.queue) > 0  # it joins behind a head that could not be placed
        try:
            self.queue.push(job.query_id, job.payer, job, now)
        except QueueFull:
            job.outcome, job.end_s = REFUSED, now
        self._schedule_next_arrival()
        # Every other change (a worker frees, dies, recovers, a new day, a probe, an
        # expiry) dispatches itself, so an arrival that queued behind the head leaves
        # the last dispatch's verdict standing: skipping it is exact, only faster.
        if expired or not behind:
            self._dispatch()

    def _quote(self, query_type: str, now: float) -> Quote:
        """``PriceBook.quote``; reused while the window's average is unchanged (a quote is a
        pure function of the average), which only saves the exact-fraction arithmetic."""
        avg = self.book.tracker.average(query_type, now)
        cached = self._quotes.get(query_type)
        if cached is None or cached.avg_latency_s != avg:
            cached = self._quotes[query_type] = self.book.quote(query_type, None, now)
        return cached

    def _expire(self, now: float) -> int:
        """Refund queued (and retry-lane) queries past their deadline; returns how many."""
        expired = self.queue.expire(now)
        for entry in expired:
            entry.item.outcome = EXPIRED
            entry.item.end_s = entry.deadline_s
        timeout = self.scenario.queue_timeout_s
        late = [j for j in self.retry if j.arrival_s + timeout <= now] if self.retry else []
        for job in late:  # a retried query keeps its original queue deadline
            self.retry.remove(job)
            job.outcome, job.end_s = EXPIRED, job.arrival_s + timeout
        return len(expired) + len(late)

    def _place(self, job: Job, idle: list[Candidate]) -> SimWorker | None | bool:
        """The idle worker selection gives ``job``; None if none may take it; False if out of attempts."""
        selection = select(idle, Request(job.query_type, job.quote.units, tried=frozenset(job.failed)))
        attempt = next_attempt(selection, job.failed, self.scenario.max_attempts)
        if isinstance(attempt, Exhausted):
            return False if attempt.reason is GiveUp.MAX_ATTEMPTS else None
        return self._workers_by_id[attempt.candidate.worker_id]

    def _dispatch(self) -> None:
        """Start work on idle workers: retried queries first, then the fair queue's head.

        The fair queue is served strictly in its order: when no idle worker may
        take its head, the head (and everything behind it) waits.
        """
        now = self.loop.now_s
        self._expire(now)
        while True:
            idle = [w.candidate(now, self.policy) for w in self.workers if w.up and w.job is None]
            if not idle:
                return
            for job in self.retry:
                worker = self._place(job, idle)
                if worker is not None:
                    self.retry.remove(job)
                    break
            else:
                entry = self.queue.peek()
                if entry is None:
                    return
                job = entry.item
                worker = self._place(job, idle)
                if worker is None:
                    return
                self.queue.pop()
            if worker is False:
                self._finish_failed(job, now)
            else:
                self._start(job, worker, now)

    def _by_id(self, worker_id: str) -> SimWorker:
        return self._workers_by_id[worker_id]

    def _start(self, job: Job, worker: SimWorker, now: float) -> None:
        service_s = worker.cls.service[job.query_type].sample(self._service_rng)
        job.start_s, job.worker_id, job.worker_class = now, worker.worker_id, worker.cls.name
        worker.job, worker.job_started_s = job, now
        worker.completion = self.loop.after(service_s, lambda: self._complete(worker))

    def _complete(self, worker: SimWorker) -> None:
        now = self.loop.now_s
        job = worker.job
        assert job is not None  # only scheduled while a job runs; cancelled on failure
        service_s = now - worker.job_started_s
        worker.job, worker.completion = None, None
        worker.busy_s += service_s
        worker.daily_used_s += service_s
        worker.served += 1
        worker.earned_units += job.quote.units
        worker.health = on_success(worker.health, self.policy).after
        job.outcome, job.end_s = SERVED, now
        latency_s = now - job.arrival_s
        self.book.record(job.query_type, latency_s, now)
        self.latency_log.append((job.query_type, latency_s, now))
        self._dispatch()

    def _finish_failed(self, job: Job, now: float) -> None:
        job.outcome, job.end_s = FAILED, now

    # -- failures, probes, days -----------------------------------------------------

    def _schedule_failure(self, worker: SimWorker) -> None:
        if worker.cls.mtbf_h is not None:
            self.loop.after(self._fail_rng.expovariate(1.0 / (worker.cls.mtbf_h * 3600.0)),
                            lambda: self._fail(worker))

    def schedule_outage(self, worker_id: str, at_s: float, down_s: float) -> None:
        """Make ``worker_id`` die at ``at_s`` and come back ``down_s`` later (call before :meth:`run`)."""
        worker = self._workers_by_id[worker_id]
        self.loop.schedule(at_s, lambda: self._fail(worker, down_s))

    def _fail(self, worker: SimWorker, down_s: float | None = None) -> None:
        if not worker.up:
            return  # already down (an outage on top of a random failure)
        now = self.loop.now_s
        worker.up, worker.down_since_s = False, now
        worker.health = on_ad(worker.health, now)  # its last ad: it goes stale from here
        worker.failures += 1
        job = worker.job
        if job is not None:
            assert worker.completion is not None
            worker.completion.cancel()
            worker.busy_s += now - worker.job_started_s
            worker.daily_used_s += now - worker.job_started_s
            worker.job = worker.completion = None
            # The broker sees the stream drop: a network fault, not blamed on the worker.
            worker.health = on_fault(worker.health, Fault(FaultKind.CONNECTION_LOST), self.policy).after
            job.failed.append(worker.worker_id)
            job.start_s = job.worker_id = job.worker_class = None
            if len(job.failed) >= self.scenario.max_attempts:
                self._finish_failed(job, now)
            else:
                self.retry.appendleft(job)
        if down_s is None:
            down_s = self._fail_rng.expovariate(1.0 / (worker.cls.mttr_h * 3600.0))
        self.loop.after(down_s, lambda: self._recover(worker))
        self.loop.after(self.scenario.probe_interval_s, lambda: self._probe(worker))
        self._dispatch()

    def _probe(self, worker: SimWorker) -> None:
        if worker.up:
            worker.health = on_success(worker.health, self.policy).after
            self._dispatch()  # it may be back from the blacklist
            return
        worker.health = on_fault(worker.health, Fault(FaultKind.CHECK_UNANSWERED), self.policy).after
        self.loop.after(self.scenario.probe_interval_s, lambda: self._probe(worker))

    def _recover(self, worker: SimWorker) -> None:
        now = self.loop.now_s
        worker.up = True
        worker.down_s += now - worker.down_since_s
        worker.health = on_ad(worker.health, now)
        self._schedule_failure(worker)
        self._dispatch()

    def _new_day(self) -> None:
        for w in self.workers:
            w.daily_used_s = 0.0
        self._dispatch()

    def _sample(self) -> None:
        now = self.loop.now_s
        if self._expire(now):
            self._dispatch()
        quotes = {t: self._quote(t, now) for t in self.scenario.query_types}
        up = [w.candidate(now, self.policy) for w in self.workers if w.up]
        active = {t: sum(1 for c in up if exclusion_reason(c, Request(t, q.units)) is None)
                  for t, q in quotes.items()}
        busy = sum(1 for w in self.workers if w.job is not None)
        self.samples.append(Sample(now, self.queue.depth + len(self.retry), busy, quotes, active))
        if now + self.scenario.sample_interval_s < self.scenario.duration_s:
            self.loop.after(self.scenario.sample_interval_s, self._sample)


def simulate(scenario: Scenario, seed: int = 0, arrivals: Iterable[Arrival] | None = None) -> SimResult:
    """Run ``scenario`` once with ``seed`` (or the given arrivals instead of its Poisson demand)."""
    return Realm(scenario, seed, arrivals).run()
