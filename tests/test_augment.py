import torch

from kdray.data.augment import AugmentParams, apply_augment, normalize, sample_augment, view_count, view_ids


def _reference(image: torch.Tensor, dy: int, dx: int, flip: bool, padding: int) -> torch.Tensor:
    """torchvision's order: zero-pad, crop at (dy, dx), then mirror — one image, by slicing."""
    padded = torch.zeros(image.shape[0], image.shape[1] + 2 * padding, image.shape[2] + 2 * padding, dtype=image.dtype)
    padded[:, padding : padding + image.shape[1], padding : padding + image.shape[2]] = image
    crop = padded[:, dy : dy + image.shape[1], dx : dx + image.shape[2]]
    return crop.flip(-1) if flip else crop


def test_batch_crop_and_flip_match_per_image_slicing() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 6, 6), dtype=torch.uint8, generator=generator)
    params = sample_augment(16, padding=2, flip=True, generator=generator, device=torch.device("cpu"))
    out = apply_augment(images, params, padding=2)
    assert out.shape == images.shape and out.dtype == torch.uint8
    for i in range(16):
        dy, dx = params.offsets[i].tolist()
        assert torch.equal(out[i], _reference(images[i], dy, dx, bool(params.flips[i]), 2))
    assert params.flips.any() and not params.flips.all()


def test_center_offset_without_flip_is_identity() -> None:
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    params = AugmentParams(torch.full((4, 2), 3), torch.zeros(4, dtype=torch.bool))
    assert torch.equal(apply_augment(images, params, padding=3), images)


def test_no_flip_option_never_flips() -> None:
    generator = torch.Generator().manual_seed(1)
    params = sample_augment(100, padding=1, flip=False, generator=generator, device=torch.device("cpu"))
    assert not params.flips.any() and params.offsets.min() >= 0 and params.offsets.max() <= 2


def test_normalize() -> None:
    images = torch.tensor([[[[0, 255]]], [[[51, 102]]]], dtype=torch.uint8)
    out = normalize(images, torch.tensor([0.5]), torch.tensor([0.25]))
    expected = (torch.tensor([[0.0, 1.0], [0.2, 0.4]]) - 0.5) / 0.25
    assert torch.allclose(out.view(2, 2), expected)


def test_view_ids_number_every_crop_and_flip_once() -> None:
    for padding, flip in [(0, False), (0, True), (1, False), (2, True)]:
        side = 2 * padding + 1
        rows, columns, flips = torch.meshgrid(
            torch.arange(side), torch.arange(side), torch.tensor([0, 1] if flip else [0]), indexing="ij"
        )
        params = AugmentParams(torch.stack([rows.flatten(), columns.flatten()], 1), flips.flatten().bool())
        ids = view_ids(params, padding, flip)
        assert sorted(ids.tolist()) == list(range(view_count(padding, flip)))
    assert view_count(4, True) == 162
