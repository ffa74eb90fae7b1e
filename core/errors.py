class UserError(Exception):
    """An error caused by the user's input; shown as one line, never as a traceback."""


class ModelLoadError(UserError):
    """A model path or file that cannot be loaded."""


def check_text(text: str, what: str) -> str:
    """``text`` itself, or a ``UserError`` when it cannot be encoded as UTF-8: undecodable bytes typed on a command
    line reach Python as lone surrogates, which the tokenizer and the PNG metadata would fail on deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(f"the {what} holds bytes that are not valid UTF-8 text (at character {exc.start}); "
                        "retype it or fix the terminal's encoding") from None
    return text
