"""A user metric for the tests, loaded by its import path `support.user_metric:shared_chars`."""


def shared_chars(prediction: str, reference: str) -> float:
    """Fraction of the reference's characters that the prediction has at the same position."""
    if not reference:
        return float(not prediction)
    return sum(a == b for a, b in zip(prediction, reference, strict=False)) / len(reference)
