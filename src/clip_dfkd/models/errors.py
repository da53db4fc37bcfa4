from clip_dfkd.errors import UserError


class ModelNotFoundError(UserError, RuntimeError):
    """Weights that cannot be loaded here; the message says how to point at a local copy."""
