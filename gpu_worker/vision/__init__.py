"""Vision-language engines."""
