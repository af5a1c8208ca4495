"""solc:: custom ops. Importing this package registers them with torch.library."""
from runtime.ops import library  # noqa: F401
