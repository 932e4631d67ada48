"""Anti-entropy for the ledger: what to pull from a peer, and in which order to serve it.

Two parts, so the sync stream (``p2p/sync_stream.py``) only moves bytes:

* **Planning (pure).** Peers compare :class:`AccountTip` records: per account
  the *effective* frontier (height, hash), the *stored* tip height and the
  fork height. Comparing effective frontiers alone misses evidence: a frozen
  or stalled chain stores blocks above its effective tip, and two replicas
  can agree on the frontier while one lacks a whole branch. :func:`plan_pulls`
  says, per account whose record differs:

  - we do not know the account                → pull from height 0;
  - either side has it frozen (a fork)         → pull from height 0, so every
    sibling at every height meets in our store and the fork rule decides;
  - no fork known, and the peer holds nothing above our effective tip: nothing
    if we store the peer's effective frontier block (it holds a prefix of our
    chain and will pull from us), else height 0 (the chains diverged: a fork
    nobody has seen yet);
  - otherwise                                  → pull from our effective
    height + 1 with ``anchor`` = our effective frontier hash. The server
    starts at height 0 instead when it does not hold that anchor at that
    height (its chain does not pass through ours), so one round trip finds
    the divergence.

  Records that are equal are skipped: equal records for every account imply
  equal state hashes (:meth:`Ledger.state_hash` covers a subset of the record).

* **Serving (runs on the ledger's thread).** :func:`tips_page` lists records
  in account order, a bounded page at a time. :class:`OrderedReader` streams
  the blocks of a set of pulls in *dependency order*: before a receive whose
  source is a send still to be served in another pulled chain, it serves that
  chain up to the send. A late joiner can then apply every block as it
  arrives instead of parking whole chains in the bounded pending pool. (Blocks
  form a DAG, but a cycle between *chains* is possible around fork siblings;
  it is broken by serving anyway, and the pool sorts it out.)

The store readers below use the ledger's LevelDB handle under its lock, because
:class:`Ledger` has no bounded, resumable listing of accounts or chains yet
(``blocks_from`` loads a whole chain). They are read-only and should move into
``Ledger`` as methods (``tips_page``/``chain_window``) when the ledger owner adds
them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from itertools import islice

from ledger import store
from ledger.blocks import Block, BlockError, parse_block

_CHAIN_END = b"\xff" * 41  # past any height(8) + hash(32)
_WINDOW = 32  # chain keys read per LevelDB seek in OrderedReader (memory: window x pulled chains)


@dataclass(frozen=True)
class AccountTip:
    """What a peer tells another about one account.

    ``eff_height`` is -1 (and ``eff_hash`` None) when nothing of the account
    counts; ``tip_height`` is the highest stored height (forks and frozen
    blocks included); ``fork_height`` is None unless the account is frozen.
    """

    account: bytes
    eff_height: int
    eff_hash: bytes | None
    tip_height: int
    fork_height: int | None

    def to_wire(self) -> list:
        return [self.account, self.eff_height, self.eff_hash, self.tip_height, self.fork_height]

    @classmethod
    def from_wire(cls, item: object) -> "AccountTip":
        """Decode one listing entry; ValueError when it is not well formed."""
        if not isinstance(item, list) or len(item) != 5:
            raise ValueError("an account entry is a list of 5 items")
        account, eff_height, eff_hash, tip_height, fork_height = item
        if not (isinstance(account, bytes) and len(account) == 32):
            raise ValueError("account must be 32 bytes")
        if not (_is_int(eff_height) and _is_int(tip_height) and -1 <= eff_height <= tip_height and tip_height >= 0):
            raise ValueError("heights out of range")
        if (eff_hash is None) != (eff_height == -1) or (eff_hash is not None and not _is_hash(eff_hash)):
            raise ValueError("effective hash must be 32 bytes exactly when the effective height is >= 0")
        if fork_height is not None and not (_is_int(fork_height) and 0 <= fork_height <= tip_height):
            raise ValueError("fork height out of range")
        return cls(account, eff_height, eff_hash, tip_height, fork_height)


@dataclass(frozen=True, order=True)
class Pull:
    """Ask for ``account``'s stored blocks from ``from_height`` up (every sibling at each height).

    ``anchor`` is the hash of our block at ``from_height - 1``: the server
    serves from height 0 instead when it does not hold that block there.
    """

    account: bytes
    from_height: int
    anchor: bytes | None = None

    def to_wire(self) -> list:
        return [self.account, self.from_height, self.anchor]

    @classmethod
    def from_wire(cls, item: object) -> "Pull":
        if not isinstance(item, list) or len(item) != 3:
            raise ValueError("a pull is a list of 3 items")
        account, from_height, anchor = item
        if not (isinstance(account, bytes) and len(account) == 32):
            raise ValueError("account must be 32 bytes")
        if not (_is_int(from_height) and 0 <= from_height < 2**63):
            raise ValueError("from_height out of range")
        if (anchor is None) != (from_height == 0) or (anchor is not None and not _is_hash(anchor)):
            raise ValueError("anchor must be 32 bytes exactly when from_height > 0")
        return cls(account, from_height, anchor)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 32


# ------------------------------------------------------------------ planning (pure)


def plan_pull(mine: AccountTip | None, theirs: AccountTip, *, holds_their_frontier: bool = False) -> Pull | None:
    """The pull for one account (None: nothing to fetch). See the module docstring.

    ``holds_their_frontier``: whether we store the block ``theirs.eff_hash``
    (lets a peer that is merely behind us cost nothing).
    """
    if mine is None or mine.tip_height < 0:
        return Pull(theirs.account, 0)
    if mine == theirs:
        return None
    if mine.fork_height is not None or theirs.fork_height is not None:
        return Pull(theirs.account, 0)
    if mine.eff_height < 0:
        return Pull(theirs.account, 0)
    if theirs.eff_height <= mine.eff_height and theirs.tip_height <= mine.tip_height:
        if theirs.eff_height < 0 or holds_their_frontier:
            return None  # they hold a prefix of our chain; they pull from us
        return Pull(theirs.account, 0)  # their frontier is not on our chain: a fork nobody has seen yet
    return Pull(theirs.account, mine.eff_height + 1, mine.eff_hash)


def plan_pulls(
    local: Mapping[bytes, AccountTip], remote: Iterable[AccountTip], held: Container[bytes] = frozenset()
) -> list[Pull]:
    """Pulls for every remote account whose record differs from ours, in account order.

    ``held``: the remote effective hashes we store (see :func:`plan_pull`).
    """
    pulls = []
    for theirs in sorted(remote, key=lambda tip: tip.account):
        held_it = theirs.eff_hash is not None and theirs.eff_hash in held
        pull = plan_pull(local.get(theirs.account), theirs, holds_their_frontier=held_it)
        if pull is not None:
            pulls.append(pull)
    return pulls


def plan_against(ledger, remote: list[AccountTip]) -> list[Pull]:
    """:func:`plan_pulls` against our own ledger (run on the ledger thread)."""
    local = local_tips(ledger, (tip.account for tip in remote))
    held = set()
    for theirs in remote:
        mine = local[theirs.account]
        if theirs.eff_hash is not None and mine.tip_height >= 0 and theirs.eff_height <= mine.eff_height:
            if ledger.get_block(theirs.eff_hash) is not None:
                held.add(theirs.eff_hash)
    return plan_pulls(local, remote, held)


# ------------------------------------------------------------------ store readers (ledger thread)


def tip_of(ledger, account: bytes) -> AccountTip:
    """Our record of one account (tip_height -1 when we hold none of its blocks)."""
    st = ledger.account_state(account)
    return AccountTip(account, st.eff_height, st.eff_hash, st.tip_height, st.fork_height)


def local_tips(ledger, accounts: Iterable[bytes]) -> dict[bytes, AccountTip]:
    return {account: tip_of(ledger, account) for account in accounts}


def tips_page(ledger, after: bytes | None, limit: int) -> tuple[list[AccountTip], bool]:
    """Up to ``limit`` records of accounts after ``after`` (exclusive) in key order, and whether more follow."""
    with ledger._lock:
        ledger._check_open()
        db = ledger._db
        start = store.ACCOUNT + (after + b"\x00" if after is not None else b"")
        out: list[AccountTip] = []
        it = db.iterator(start=start, stop=store.ACCOUNT + b"\xff" * 33)
        more = False
        for key, rec in it:
            if len(out) == limit:
                more = True
                break
            account = key[1:]
            tip = store.from_u64(rec[:8])
            fork = store.from_u64(rec[8:16]) if len(rec) == 16 else None
            frontier = db.get(store.FRONTIER + account)
            if frontier is None:
                out.append(AccountTip(account, -1, None, tip, fork))
            else:
                out.append(AccountTip(account, store.from_u64(frontier[:8]), frontier[8:], tip, fork))
        it.close()
        return out, more


@dataclass(slots=True)
class _Chain:
    account: bytes
    next_key: bytes  #: first chain key not yet read from the store
    served_below: bytes  #: every chain key < this has been served (or was never asked for)
    buffer: deque  #: read but not yet served: (key, raw, block)
    exhausted: bool = False


class OrderedReader:
    """Serves the blocks of a set of pulls in dependency order, a bounded batch at a time.

    Built and used only on the ledger's thread (``ledger_call``); holds at
    most ``_WINDOW`` blocks per pulled account in memory. ``budget`` caps the
    blocks served in total.
    """

    def __init__(self, ledger, pulls: Iterable[Pull], *, budget: int) -> None:
        self.ledger = ledger
        self.budget = budget
        self.served = 0
        self.restarted = 0  #: pulls whose anchor we did not hold (served from height 0)
        self._chains: dict[bytes, _Chain] = {}
        for pull in pulls:
            start_height = pull.from_height
            if start_height > 0:
                anchor = ledger.get_block(pull.anchor)
                if anchor is None or anchor.account != pull.account or anchor.height != start_height - 1:
                    start_height = 0
                    self.restarted += 1
            start = store.chain_key(pull.account, start_height)
            known = self._chains.get(pull.account)
            if known is None or start < known.next_key:
                self._chains[pull.account] = _Chain(pull.account, start, start, deque())
        self._order = deque(sorted(self._chains))
        self._stack: list[bytes] = []
        #: hash -> (account, height) of every block read so far (bounded by budget + windows),
        #: so most dependency checks need no store lookup.
        self._located: dict[bytes, tuple[bytes, int]] = {}

    @property
    def done(self) -> bool:
        return self.served >= self.budget or (not self._stack and not self._order)

    def next_batch(self, max_blocks: int, max_bytes: int) -> tuple[list[bytes], bool]:
        """Up to ``max_blocks`` raw blocks totalling at most ``max_bytes`` (at least one); and whether more follow."""
        with self.ledger._lock:
            self.ledger._check_open()
            out: list[bytes] = []
            size = 0
            while len(out) < max_blocks and self.served < self.budget:
                head = self._next_servable()
                if head is None:
                    break
                chain, (key, raw, _block) = head
                if out and size + len(raw) > max_bytes:
                    break
                chain.buffer.popleft()
                chain.served_below = key + b"\x00"
                out.append(raw)
                size += len(raw)
                self.served += 1
            return out, not self.done

    # -- internals ---------------------------------------------------------
    def _peek(self, chain: _Chain):
        if not chain.buffer and not chain.exhausted:
            self._fill(chain)
        return chain.buffer[0] if chain.buffer else None

    def _fill(self, chain: _Chain) -> None:
        db = self.ledger._db
        stop = store.CHAIN + chain.account + _CHAIN_END
        keys = list(islice(db.iterator(start=chain.next_key, stop=stop, include_value=False), _WINDOW))
        if len(keys) < _WINDOW:
            chain.exhausted = True
        if keys:
            chain.next_key = keys[-1] + b"\x00"
        for key in keys:
            value = db.get(store.BLOCK + key[-32:])
            if value is None:  # the chain index names a block we do not hold: store damage, skip it
                continue
            raw = value[8:]
            try:
                block = parse_block(raw)
            except BlockError:
                continue
            chain.buffer.append((key, raw, block))
            self._located[block.hash] = (block.account, block.height)

    def _waits_for(self, block: Block) -> _Chain | None:
        """The pulled chain that must first serve ``block``'s source, if any."""
        if block.type not in ("open", "receive") or block.source is None:
            return None
        located = self._located.get(block.source)
        if located is None:
            source = self.ledger.get_block(block.source)
            if source is None:  # a genesis allocation
                return None
            located = (source.account, source.height)
        account, height = located
        chain = self._chains.get(account)
        if chain is None or account == block.account:
            return None
        if store.chain_key(account, height, block.source) < chain.served_below:
            return None
        return chain

    def _next_servable(self):
        """The next (chain, head) to serve: the stack holds chains waiting on the chain above them."""
        stalled = 0
        while True:
            if not self._stack:
                if not self._order:
                    return None
                self._stack.append(self._order[0])
            chain = self._chains[self._stack[-1]]
            head = self._peek(chain)
            if head is None:
                self._stack.pop()
                if self._order and self._order[0] == chain.account:
                    self._order.popleft()
                continue
            blocker = self._waits_for(head[2])
            if blocker is None or stalled > 2 * len(self._chains) + 2:
                return chain, head  # free to go, or a genuine cycle (fork siblings): serve anyway
            stalled += 1
            if blocker.account in self._stack:
                # Waiting on a chain that is itself waiting lower down: go back to it; what it
                # waited for may have been served meanwhile.
                del self._stack[self._stack.index(blocker.account) + 1:]
            else:
                self._stack.append(blocker.account)
