"""The ``mtor-node`` command (placeholder until the spine lands)."""


def main(argv=None) -> int:
    return 0
