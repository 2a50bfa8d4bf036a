"""Pre- and post-processing of an image edit (img2img, inpainting), shared by every backend.

`prepare_edit` turns the picture and mask as uploaded (any size) and the resolved `EditSpec` into what the model
works on (image and mask at the spec's size: resized, or cut around the mask for `padding_mask_crop`) plus what
the output is composed from; `compose_edit` composes the model's outputs into what the client receives. The
service's backends (`serve_app.backend`), streamed previews included, and `LocalPipeline.edit` all go through
these two, so an edit gives the same pixels wherever it runs.

Composition is diffusers' `VaeImageProcessor.apply_overlay` (A1111's "overlay"): the input is laid back over the
model's output through the overlay mask's complement, so pixels outside the mask are the input's, not the VAE's
softened reconstruction of it. The overlay mask has a soft edge so the seam does not show (`overlay_mask`).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence

from PIL import Image, ImageFilter, ImageOps

from lightray.images import encode_png, resize_for_model
from lightray.schemas import EditSpec

OVERLAY_EDGE_PX = 2
"""Radius of the overlay's soft edge when the request gives no `mask_blur`: the overlay mask is the mask
box-blurred with this radius. A pixel with no mask pixel within 2 px horizontally and vertically (its 5×5
neighbourhood) is the input exactly; one whose 5×5 neighbourhood is all mask is the model's exactly; across a
straight edge the model's share ramps 1/5, 2/5 (the two pixels outside), 3/5, 4/5 (the two inside), then 1. A box
blur, unlike a Gaussian, has a support of exactly this radius, so where the input is kept is exact."""


@dataclasses.dataclass(frozen=True)
class PreparedEdit:
    """An edit's model-size inputs and what its outputs are composed from."""

    image: Image.Image
    """RGB, the spec's width×height: what the model edits."""
    mask: Image.Image | None
    """"L", the same size, non-zero where the model repaints (diffusers' convention); None for img2img."""
    canvas: Image.Image
    """RGB, the output's size: the picture the outputs are composed onto. The full input with
    `padding_mask_crop`, else `image`."""
    overlay: Image.Image | None
    """"L", the canvas's size: 255 where the output is the model's, 0 where it is the canvas's, in between on the
    soft edge. None: the model's outputs are returned as they are (img2img, or inpainting with `keep_unmasked`
    off and no crop)."""
    box: tuple[int, int, int, int] | None
    """With `padding_mask_crop`: the crop box (left, top, right, bottom) in the canvas, into which the model's
    output is resized back."""

    @property
    def composes(self) -> bool:
        """Whether `compose_edit` changes the model's outputs at all."""
        return self.overlay is not None


def prepare_edit(image: Image.Image, mask: Image.Image | None, spec: EditSpec) -> PreparedEdit:
    """The model's inputs for `spec` from the picture and the optional mask ("L", non-zero = repaint) as uploaded:
    the mask blurred by `spec.mask_blur`, then both cut around the mask (`padding_mask_crop`) or resized to the
    spec's size as diffusers' pipelines resize them; and the overlay that `compose_edit` applies."""
    image = image.convert("RGB")
    if mask is not None:
        mask = mask.convert("L")
        if spec.mask_blur:
            mask = blur_mask(mask, spec.mask_blur)
    box = None
    if spec.padding_mask_crop is not None:
        if mask is None:
            raise ValueError("padding_mask_crop needs a mask")
        model_image, model_mask, box = crop_for_inpainting(image, mask, spec.width, spec.height,
                                                           spec.padding_mask_crop)
        canvas, canvas_mask = image, mask
    else:
        model_image = resize_for_model(image, spec.width, spec.height)
        model_mask = None if mask is None else resize_for_model(mask, spec.width, spec.height)
        canvas, canvas_mask = model_image, model_mask
    overlay = None
    if canvas_mask is not None:
        if spec.keep_unmasked:
            overlay = overlay_mask(canvas_mask, spec.mask_blur)
        elif box is not None:  # nothing kept by the mask, but the crop still has to go back into its box
            overlay = Image.new("L", canvas.size, 0)
            overlay.paste(255, box)
    return PreparedEdit(model_image, model_mask, canvas, overlay, box)


def overlay_mask(mask: Image.Image, mask_blur: int | None) -> Image.Image:
    """The overlay's alpha for `mask` (at the canvas's size, already blurred by `mask_blur` if that is set): the
    blurred mask itself when the request chose a blur (0: a hard edge), as diffusers and A1111 use it; otherwise
    the mask with a soft edge of `OVERLAY_EDGE_PX`."""
    if mask_blur is not None:
        return mask
    return mask.filter(ImageFilter.BoxBlur(OVERLAY_EDGE_PX))


def output_size(spec: EditSpec, image_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the images an edit of a picture of `image_size` returns: the picture's own size with
    `padding_mask_crop` (the crop is pasted back into it), else the spec's."""
    return image_size if spec.padding_mask_crop is not None else (spec.width, spec.height)


def compose_edit(outputs: Sequence[Image.Image], prepared: PreparedEdit) -> list[Image.Image]:
    """What the client receives for the model's `outputs` (spec-size images, one per seed): each placed into its
    crop box if there is one, with the canvas laid over it outside the overlay."""
    if prepared.overlay is None:
        return list(outputs)
    return [_apply_overlay(prepared.overlay, prepared.canvas, _placed(out.convert("RGB"), prepared))
            for out in outputs]


def compose_pngs(pngs: Sequence[bytes], prepared: PreparedEdit) -> list[bytes]:
    """`compose_edit` for PNG bytes (what the graph's VAE replica returns); unchanged bytes when nothing is
    composed. PNG is lossless, so this gives the bytes `compose_edit` then `encode_png` would."""
    if not prepared.composes:
        return list(pngs)
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    return [encode_png(im) for im in compose_edit(images, prepared)]


def _placed(output: Image.Image, prepared: PreparedEdit) -> Image.Image:
    """The model's output on the canvas's frame: resized into the crop box on black (as `apply_overlay` places
    it), or as it is without a crop."""
    if prepared.box is None:
        return output
    x, y, x2, y2 = prepared.box
    base = Image.new("RGBA", prepared.canvas.size)
    base.paste(_processor().resize(output, height=y2 - y, width=x2 - x, resize_mode="crop"), (x, y))
    return base.convert("RGB")


def _apply_overlay(overlay: Image.Image, canvas: Image.Image, output: Image.Image) -> Image.Image:
    """diffusers' `VaeImageProcessor.apply_overlay(overlay, canvas, output)` (no crop), the same PIL calls, so the
    same rounding: here rather than imported because this runs at the ingress for every inpainting request, and
    diffusers imports torch."""
    kept = Image.new("RGBa", canvas.size)
    kept.paste(canvas.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay))
    composed = output.convert("RGBA")
    composed.alpha_composite(kept.convert("RGBA"))
    return composed.convert("RGB")


def crop_for_inpainting(image: Image.Image, mask: Image.Image, width: int, height: int,
                        pad: int) -> tuple[Image.Image, Image.Image, tuple[int, int, int, int]]:
    """diffusers' `padding_mask_crop` preprocessing: the mask's bounding box grown by `pad` and to width:height,
    cut from image and mask and resized to width×height ("fill" mode). Returns (image, mask, crop box)."""
    processor = _processor()
    box = processor.get_crop_region(mask, width, height, pad=pad)
    picture = processor.resize(image.crop(box), height, width, resize_mode="fill")
    # The pipeline's mask processor fills onto an RGB canvas, then converts to grayscale.
    edit = processor.resize(mask.crop(box), height, width, resize_mode="fill").convert("L")
    return picture, edit, box


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """diffusers' `VaeImageProcessor.blur`: a Gaussian blur of the given radius (the same PIL filter, without
    importing diffusers)."""
    return mask.filter(ImageFilter.GaussianBlur(radius))


def _processor():
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=16)  # lanczos, as the pipelines' image and mask processors
