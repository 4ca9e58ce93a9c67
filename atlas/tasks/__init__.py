"""Retrieval tasks: MQAR (Zoology) and passkey retrieval in natural-text haystacks."""
