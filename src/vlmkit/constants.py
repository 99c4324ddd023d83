"""Project-wide constants shared by every layer: the label ignore index and the image marker."""

IGNORE_INDEX = -100  # labels at positions that carry no loss (prompt, padding, image placeholders)
IMAGE_MARKER = "<image>"  # where an image goes in a prompt, before its expansion to visual-token placeholders
