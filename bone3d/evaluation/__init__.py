"""Image and morphometric evaluation."""
