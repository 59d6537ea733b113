"""keras_glas.testing: the synthetic glands the Mask R-CNN tests and benchmark train on."""
import numpy as np
import pytest

from keras_glas.testing import ellipse_glands

STYLE = dict(centre_range=(0.22, 0.78), radius_range=(0.09, 0.17), background_range=(0.75, 0.9))


def check_pipeline_format(images, y, count, size, max_instances):
    assert images.dtype == np.float32 and images.shape == (count, size, size, 3)
    assert 0 <= images.min() and images.max() <= 1
    boxes, classes, instances = y["boxes"], y["classes"], y["instances"]
    assert boxes.shape == (count, max_instances, 4) and classes.shape == (count, max_instances)
    assert instances.dtype == np.int32 and instances.shape == (count, size, size)
    for i in range(count):
        ids = np.unique(instances[i])
        drawn = int(ids.max())
        # Ids 1..k with no gaps; rows 0..k-1 hold their boxes, the rest is padding.
        assert list(ids) == list(range(drawn + 1))
        assert (classes[i, :drawn] == 0).all() and (classes[i, drawn:] == -1).all()
        assert (boxes[i, drawn:] == -1).all()
        for k in range(drawn):
            ys, xs = np.nonzero(instances[i] == k + 1)
            assert tuple(boxes[i, k]) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)


def test_batches_are_in_the_pipeline_format_and_reproducible():
    images, y = ellipse_glands(np.random.default_rng(1), 3, 48, objects=4, max_instances=6,
                               noise=0.05, **STYLE)
    check_pipeline_format(images, y, 3, 48, 6)
    again, y_again = ellipse_glands(np.random.default_rng(1), 3, 48, objects=4, max_instances=6,
                                    noise=0.05, **STYLE)
    assert np.array_equal(images, again) and np.array_equal(y["instances"], y_again["instances"])


def test_a_fixed_colour_paints_every_gland_alike_and_random_colours_differ():
    images, y = ellipse_glands(np.random.default_rng(0), 1, 64, objects=3, max_instances=3,
                               gland_colour=(0.45, 0.15, 0.4), **STYLE)
    assert np.allclose(images[0][y["instances"][0] > 0], (0.45, 0.15, 0.4))
    images, y = ellipse_glands(np.random.default_rng(0), 1, 64, objects=3, max_instances=3,
                               **STYLE)
    colours = {tuple(images[0][y["instances"][0] == k][0]) for k in (1, 2, 3)}
    assert len(colours) == 3
    assert all(0.2 <= channel <= 0.5 for colour in colours for channel in colour)


def test_a_gland_hidden_by_earlier_ones_is_left_out():
    # Seed 2 draws, in its third image, a gland inside the ones before it (an empty mask once
    # they are painted): it gets no id and no box instead of failing, and the next one takes
    # its id.
    images, y = ellipse_glands(np.random.default_rng(2), 3, 64, objects=5, max_instances=8,
                               gland_colour=(0.45, 0.15, 0.4), **STYLE)
    check_pipeline_format(images, y, 3, 64, 8)
    assert [int(y["instances"][i].max()) for i in range(3)] == [5, 5, 4]


def test_more_glands_than_rows_is_an_error():
    with pytest.raises(ValueError, match="max_instances"):
        ellipse_glands(np.random.default_rng(0), 1, 32, objects=5, max_instances=4, **STYLE)
