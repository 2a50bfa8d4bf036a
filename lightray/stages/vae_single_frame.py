"""AutoencoderKLQwenImage for single images: the causal 3D VAE folded into 2D convolutions, built once at load.

Why this is exact up to floating-point reordering: an image is one frame. Every `QwenImageCausalConv3d` pads
`kernel_t - 1` zero frames before the first frame (its feature cache starts empty), so its output for frame 0 is
the kernel's last temporal slice applied to that frame: a `conv2d` with `weight[:, :, -1]` and the same spatial
padding and stride. The resamplers' time convolutions (`time_conv` of upsample3d / downsample3d) are skipped on
the first frame, the RMS norms and the attention block act per frame, and `post_quant_conv` / `quant_conv` are
1×1×1. So the decoder and encoder of frame 0 are 2D networks with these weights, and the results differ from
diffusers' only in the order the sums are taken (measured tolerance: README, "Numerics").

Why it matters: CPU PyTorch has no fast kernel for these 3D convolutions (`aten::slow_conv3d_forward` took 86 % of
a decode), while `conv2d` runs through oneDNN; on a GPU the fold drops the two zero frames' share of the work.

`SingleFrameVae` mirrors the part of `AutoencoderKLQwenImage`'s interface that the stages use (`decode` and
`encode` on [b, c, 1, h, w] tensors, `enable_slicing`, `enable_tiling` / `use_tiling` with diffusers' tile geometry
and blending, `config`, `dtype`, `post_quant_conv`), so `VaeStage` runs either model. The 2D kernels are copied
once, here, in channels-last layout (oneDNN's fastest, and the RMS norms then reduce over contiguous channels), and
the 3D model can be dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import (
    QwenImageAttentionBlock,
    QwenImageCausalConv3d,
    QwenImageResample,
    QwenImageResidualBlock,
    QwenImageRMS_norm,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

TOLERANCE_GREY_LEVELS = {torch.float32: 1, torch.bfloat16: 6}
"""The contract (README, "Numerics"): most 8-bit grey levels an image decoded here differs from diffusers' decode of
the same latents. float32: sums reordered, output within 5e-5. bfloat16: each convolution's output is rounded to
8 mantissa bits and reordered sums round differently (measured on the real layout at toy width: max 3-5 levels,
mean 0.30-0.34). tests/test_vae_single_frame.py measures both."""


class FoldedConv2d(nn.Module):
    """A `QwenImageCausalConv3d` applied to a lone first frame: its last temporal kernel slice as a conv2d."""

    def __init__(self, conv: QwenImageCausalConv3d):
        super().__init__()
        kernel_t = conv.kernel_size[0]
        pad_w, _, pad_h, _, pad_t_front, _ = conv._padding
        if pad_t_front != kernel_t - 1:
            raise ValueError(f"a causal conv with kernel_t {kernel_t} pads {pad_t_front} frames in front; only "
                             f"kernel_t - 1 makes frame 0 see the last slice alone")
        if conv.stride[0] != 1 and kernel_t != 1:  # downsample3d's time_conv: never run on the first frame
            raise ValueError("a strided temporal kernel is not folded")
        # The slice is copied once when the module goes channels-last (`SingleFrameVae`), never per call.
        self.weight = nn.Parameter(conv.weight.detach()[:, :, -1], requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.stride = tuple(conv.stride[1:])
        self.padding = (pad_h, pad_w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class RmsNorm2d(nn.Module):
    """`QwenImageRMS_norm(images=False)` (gamma [c, 1, 1, 1]) on [b, c, h, w]; gamma shared as a [c, 1, 1] view."""

    def __init__(self, norm: QwenImageRMS_norm):
        super().__init__()
        if not norm.channel_first:
            raise ValueError("only channel-first RMS norms are folded")
        self.scale = norm.scale
        self.gamma = nn.Parameter(norm.gamma.detach().view(norm.gamma.shape[0], 1, 1), requires_grad=False)
        self.bias = norm.bias if isinstance(norm.bias, float) else nn.Parameter(
            norm.bias.detach().view(norm.bias.shape[0], 1, 1), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The diffusers norm's exact ops: normalise in float32 for half-precision inputs.
        half = x.dtype in (torch.float16, torch.bfloat16)
        normalized = F.normalize(x.float() if half else x, dim=1).to(x.dtype)
        return normalized * self.scale * self.gamma + self.bias


class ResidualBlock2d(nn.Module):
    def __init__(self, block: QwenImageResidualBlock):
        super().__init__()
        self.shortcut = (FoldedConv2d(block.conv_shortcut) if isinstance(block.conv_shortcut, QwenImageCausalConv3d)
                         else nn.Identity())
        self.norm1, self.conv1 = RmsNorm2d(block.norm1), FoldedConv2d(block.conv1)
        self.norm2, self.conv2 = RmsNorm2d(block.norm2), FoldedConv2d(block.conv2)
        self.nonlinearity = block.nonlinearity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.shortcut(x)
        x = self.conv1(self.nonlinearity(self.norm1(x)))
        x = self.conv2(self.nonlinearity(self.norm2(x)))  # dropout: identity at inference
        return x + h


class AttentionBlock2d(nn.Module):
    """`QwenImageAttentionBlock` on [b, c, h, w] (it already works per frame); its modules are reused as they are."""

    def __init__(self, block: QwenImageAttentionBlock):
        super().__init__()
        self.norm, self.to_qkv, self.proj = block.norm, block.to_qkv, block.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 1, c * 3, -1).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v).squeeze(1).permute(0, 2, 1).reshape(b, c, h, w)
        return self.proj(x) + identity


def _fold(layer: nn.Module) -> nn.Module:
    """A decoder/encoder layer's frame-0 behaviour in 2D."""
    if isinstance(layer, QwenImageResidualBlock):
        return ResidualBlock2d(layer)
    if isinstance(layer, QwenImageAttentionBlock):
        return AttentionBlock2d(layer)
    if isinstance(layer, QwenImageResample):
        # upsample2d/3d and downsample2d/3d all run only `resample` (already 2D) on frame 0.
        return layer.resample
    raise TypeError(f"no single-frame form for {type(layer).__name__}")


class _Stack2d(nn.Module):
    """conv_in → layers → norm_out → nonlinearity → conv_out: the shape of both the encoder and the decoder."""

    def __init__(self, coder: nn.Module, layers: list[nn.Module]):
        super().__init__()
        self.conv_in = FoldedConv2d(coder.conv_in)
        self.layers = nn.ModuleList(_fold(layer) for layer in layers)
        self.norm_out = RmsNorm2d(coder.norm_out)
        self.nonlinearity = coder.nonlinearity
        self.conv_out = FoldedConv2d(coder.conv_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for layer in self.layers:
            x = layer(x)
        return self.conv_out(self.nonlinearity(self.norm_out(x)))


def _decoder_layers(decoder) -> list[nn.Module]:
    mid = decoder.mid_block
    layers = [mid.resnets[0]]
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        layers += [attn, resnet]
    for up_block in decoder.up_blocks:
        layers += list(up_block.resnets)
        if up_block.upsamplers is not None:
            layers.append(up_block.upsamplers[0])
    return layers


def _encoder_layers(encoder) -> list[nn.Module]:
    mid = encoder.mid_block
    layers = list(encoder.down_blocks) + [mid.resnets[0]]
    for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
        layers += [attn, resnet]
    return layers


class SingleFrameVae(nn.Module):
    """The single-image form of an `AutoencoderKLQwenImage` (module docstring). Built from a loaded model, on its
    device and dtype; eval mode, no gradients."""

    def __init__(self, vae: AutoencoderKLQwenImage):
        super().__init__()
        self.config = vae.config
        self.temperal_downsample = vae.temperal_downsample
        self.spatial_compression_ratio = vae.spatial_compression_ratio
        self.decoder = _Stack2d(vae.decoder, _decoder_layers(vae.decoder))
        self.encoder = _Stack2d(vae.encoder, _encoder_layers(vae.encoder))
        self.post_quant_conv = FoldedConv2d(vae.post_quant_conv)
        self.quant_conv = FoldedConv2d(vae.quant_conv)
        self.use_slicing = vae.use_slicing
        self.use_tiling = vae.use_tiling
        self.tile_sample_min_height, self.tile_sample_min_width = vae.tile_sample_min_height, vae.tile_sample_min_width
        self.tile_sample_stride_height = vae.tile_sample_stride_height
        self.tile_sample_stride_width = vae.tile_sample_stride_width
        # NHWC: oneDNN's convolutions run fastest on it, and the RMS norms reduce over channels, which are then
        # contiguous (2.2x faster at 128² on this CPU than NCHW, where the norms alone took 43 % of a decode).
        self.to(memory_format=torch.channels_last)
        self.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def enable_tiling(self, tile_sample_min_height: int | None = None, tile_sample_min_width: int | None = None,
                      tile_sample_stride_height: int | None = None, tile_sample_stride_width: int | None = None) -> None:
        """As `AutoencoderKLQwenImage.enable_tiling`: the same geometry, so tiled results match diffusers' tiling."""
        self.use_tiling = True
        self.tile_sample_min_height = tile_sample_min_height or self.tile_sample_min_height
        self.tile_sample_min_width = tile_sample_min_width or self.tile_sample_min_width
        self.tile_sample_stride_height = tile_sample_stride_height or self.tile_sample_stride_height
        self.tile_sample_stride_width = tile_sample_stride_width or self.tile_sample_stride_width

    # ------------------------------------------------------------------------------------------ decode

    @staticmethod
    def _one_frame(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[2] != 1:
            raise ValueError(f"SingleFrameVae takes [b, c, 1, h, w] (one frame), got shape {tuple(x.shape)}")
        return x[:, :, 0]

    def _decode_2d(self, z: torch.Tensor) -> torch.Tensor:
        ratio = self.spatial_compression_ratio
        if self.use_tiling and (z.shape[-1] > self.tile_sample_min_width // ratio
                                or z.shape[-2] > self.tile_sample_min_height // ratio):
            return self._tiled_decode_2d(z)
        z = z.contiguous(memory_format=torch.channels_last)
        return torch.clamp(self.decoder(self.post_quant_conv(z)), min=-1.0, max=1.0)

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        """[b, z, 1, h, w] latents → ([b, 3, 1, H, W] pixels in [-1, 1],), as `AutoencoderKLQwenImage.decode(...,
        return_dict=False)`."""
        z = self._one_frame(z)
        if self.use_slicing and z.shape[0] > 1:
            out = torch.cat([self._decode_2d(one) for one in z.split(1)])
        else:
            out = self._decode_2d(z)
        return (out.unsqueeze(2),)

    def _tiled_decode_2d(self, z: torch.Tensor) -> torch.Tensor:
        """diffusers' `tiled_decode` on one frame: the same tiles, blend and crop (untiled tiles are not clamped
        there either)."""
        ratio = self.spatial_compression_ratio
        height, width = z.shape[-2:]
        tile_h, tile_w = self.tile_sample_min_height // ratio, self.tile_sample_min_width // ratio
        stride_h, stride_w = self.tile_sample_stride_height // ratio, self.tile_sample_stride_width // ratio
        z = z.contiguous(memory_format=torch.channels_last)
        rows = [[self.decoder(self.post_quant_conv(z[:, :, i:i + tile_h, j:j + tile_w]))
                 for j in range(0, width, stride_w)] for i in range(0, height, stride_h)]
        return _blend_tiles(rows, self.tile_sample_min_height - self.tile_sample_stride_height,
                            self.tile_sample_min_width - self.tile_sample_stride_width,
                            self.tile_sample_stride_height, self.tile_sample_stride_width,
                            height * ratio, width * ratio)

    # ------------------------------------------------------------------------------------------ encode

    def _encode_2d(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and (x.shape[-1] > self.tile_sample_min_width or x.shape[-2] > self.tile_sample_min_height):
            return self._tiled_encode_2d(x)
        return self.quant_conv(self.encoder(x.contiguous(memory_format=torch.channels_last)))

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """[b, 3, 1, H, W] pixels → the posterior (`.latent_dist` with return_dict, as diffusers), over
        [b, 2z, 1, h, w] moments."""
        x = self._one_frame(x)
        if self.use_slicing and x.shape[0] > 1:
            h = torch.cat([self._encode_2d(one) for one in x.split(1)])
        else:
            h = self._encode_2d(x)
        posterior = DiagonalGaussianDistribution(h.unsqueeze(2))
        if not return_dict:
            return (posterior,)
        return _EncoderOutput(posterior)

    def _tiled_encode_2d(self, x: torch.Tensor) -> torch.Tensor:
        """diffusers' `tiled_encode` on one frame (quant_conv per tile, blended in latent space)."""
        ratio = self.spatial_compression_ratio
        height, width = x.shape[-2:]
        tile_h, tile_w = self.tile_sample_min_height, self.tile_sample_min_width
        x = x.contiguous(memory_format=torch.channels_last)
        rows = [[self.quant_conv(self.encoder(x[:, :, i:i + tile_h, j:j + tile_w]))
                 for j in range(0, width, self.tile_sample_stride_width)]
                for i in range(0, height, self.tile_sample_stride_height)]
        stride_h, stride_w = self.tile_sample_stride_height // ratio, self.tile_sample_stride_width // ratio
        return _blend_tiles(rows, tile_h // ratio - stride_h, tile_w // ratio - stride_w, stride_h, stride_w,
                            height // ratio, width // ratio)


class _EncoderOutput:
    def __init__(self, latent_dist: DiagonalGaussianDistribution):
        self.latent_dist = latent_dist


def _blend_tiles(rows: list[list[torch.Tensor]], blend_h: int, blend_w: int, keep_h: int, keep_w: int,
                 out_h: int, out_w: int) -> torch.Tensor:
    """Blend each tile into the one above and the one to its left over the overlap (linear ramps, as diffusers'
    `blend_v` / `blend_h`), keep its top-left keep_h × keep_w, and stitch."""
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _ramp(rows[i - 1][j], tile, blend_h, dim=-2)
            if j > 0:
                tile = _ramp(row[j - 1], tile, blend_w, dim=-1)
            result_row.append(tile[..., :keep_h, :keep_w])
        result_rows.append(torch.cat(result_row, dim=-1))
    return torch.cat(result_rows, dim=-2)[..., :out_h, :out_w]


def _ramp(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """diffusers' blend, in place on `b`, element for element: b[y] = a[-extent + y]·(1 - y/extent) + b[y]·y/extent."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    for y in range(extent):
        a_y = a.narrow(dim, a.shape[dim] - extent + y, 1)
        b_y = b.narrow(dim, y, 1)
        b_y.copy_(a_y * (1 - y / extent) + b_y * (y / extent))
    return b
