"""Draws examples/objects.png: three shapes by hand-picked coordinates with plain PIL (not the
trainer's renderer, trainer/world.py), at the sizes the shipped model was trained on (an object
spans at most about 0.9 of a third of the picture). `python examples/draw_objects.py`."""

from pathlib import Path

from PIL import Image, ImageDraw

img = Image.new("RGB", (400, 300), (238, 236, 228))
draw = ImageDraw.Draw(img)
draw.ellipse([28, 22, 108, 102], fill=(200, 30, 35))  # red circle, top left
draw.rectangle([290, 118, 356, 184], fill=(30, 70, 210))  # blue square, right
draw.polygon([(200, 212), (244, 286), (156, 286)], fill=(245, 200, 20))  # yellow triangle, bottom
img.save(Path(__file__).with_name("objects.png"))
