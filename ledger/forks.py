"""Equivocation proofs: two conflicting blocks one account signed on the same previous block.

A :class:`ForkProof` is self-contained: the two raw signed blocks. Anyone
holding only the realm id can check it (:func:`check_fork_proof`) and then
knows the account is frozen; a node that receives one simply submits both
blocks to its ledger, which freezes the account by the ordinary fork rule.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ledger.blocks import Block, BlockError, parse_block
from ledger.effective import conflict
from ledger.validate import signature_ok
from node import codec

FORK_PROOF_VERSION = 1
MAX_FORK_PROOF_BYTES = 8192


class ForkProofVerdict(enum.Enum):
    VALID = "valid"
    MALFORMED = "malformed"
    WRONG_REALM = "wrong_realm"
    BAD_SIGNATURE = "bad_signature"
    #: same block twice, different accounts or previous blocks, or a re-anchor and the credit it replaces
    NOT_A_FORK = "not_a_fork"


@dataclass(frozen=True)
class ForkProof:
    """Two raw blocks (canonical bytes), ordered by hash."""

    first: bytes
    second: bytes

    def to_bytes(self) -> bytes:
        return codec.encode({"v": FORK_PROOF_VERSION, "blocks": sorted([self.first, self.second])})

    @classmethod
    def from_bytes(cls, data: bytes) -> "ForkProof":
        """Decode (not check) a proof; raises ValueError on a malformed envelope."""
        obj = codec.decode(data, max_bytes=MAX_FORK_PROOF_BYTES)
        if not isinstance(obj, dict) or obj.get("v") != FORK_PROOF_VERSION or set(obj) != {"v", "blocks"}:
            raise ValueError("not a version-1 fork proof")
        blocks = obj["blocks"]
        if not isinstance(blocks, list) or len(blocks) != 2 or not all(isinstance(b, bytes) for b in blocks):
            raise ValueError("a fork proof holds exactly two blocks")
        return cls(blocks[0], blocks[1])

    def to_json(self) -> dict:
        a, b = parse_block(self.first), parse_block(self.second)
        return {"account": a.account.hex(), "height": a.height, "blocks": [a.to_json(), b.to_json()],
                "proof": self.to_bytes().hex()}


def check_fork_proof(proof: ForkProof | bytes, realm: bytes) -> tuple[ForkProofVerdict, tuple[Block, Block] | None]:
    """Check a proof against ``realm``; on VALID also return the two blocks."""
    try:
        if isinstance(proof, (bytes, bytearray)):
            proof = ForkProof.from_bytes(bytes(proof))
        a, b = parse_block(proof.first), parse_block(proof.second)
    except (ValueError, BlockError, codec.CodecError):
        return ForkProofVerdict.MALFORMED, None
    if a.realm != realm or b.realm != realm:
        return ForkProofVerdict.WRONG_REALM, None
    if a.account != b.account or a.height != b.height or not conflict(a, b):
        return ForkProofVerdict.NOT_A_FORK, None
    if not (signature_ok(a) and signature_ok(b)):
        return ForkProofVerdict.BAD_SIGNATURE, None
    return ForkProofVerdict.VALID, (a, b)
