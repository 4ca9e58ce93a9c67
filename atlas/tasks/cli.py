"""`atlas eval mqar|passkey` (filled in with the retrieval tasks)."""


def add_eval_commands(sub) -> None:
    sub.add_parser("eval", help="retrieval evaluations (mqar, passkey)")
