"""The windows of a rolling log-likelihood: a text longer than the context, scored token by token in windows.

lm-eval defines `loglikelihood_rolling` by disjoint windows of its max_length L (get_rolling_token_windows with
context_len 1, then make_disjoint_window); each token is predicted once, in the window that holds it:

    tokens t0 .. t9, L = 4, prefix token p (lm-eval: the tokenizer's BOS, else its EOS)
    window  context       predicts        input (context + prediction less its last token)
    1       p             t0 t1 t2 t3     p t0 t1 t2
    2       t3            t4 t5 t6 t7     t3 t4 t5 t6
    3       t5 t6 t7      t8 t9           t5 t6 t7 t8      (the last, shorter: the tokens before it fill L)

Every input is at most L tokens. The engine scores each window as a sequence of its own
(Engine._add_rolling); tests/runner/test_scoring_engine.py holds these windows to lm-eval's functions.
"""

from __future__ import annotations


def rolling_windows(tokens: list[int], prefix_token: int, window: int) -> list[tuple[list[int], list[int]]]:
    """(context, predicted tokens) of each window of `window` tokens over `tokens`, in order; none for no tokens."""
    if window < 1:
        raise ValueError(f"a rolling window holds at least one token, got {window}")
    if not tokens:
        return []
    first = min(window, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    done = first
    while done < len(tokens):
        count = min(len(tokens) - done, window)
        end = done + count
        windows.append((tokens[end - window - 1 : end - count], tokens[end - count : end]))
        done = end
    return windows
