"""The printed digits' glyph canvases are cached under a byte bound, not a count: 4096 canvases of
2 MiB each (size 64) held 8 GiB. The cache changes no image."""

import numpy as np
import torch

from genkernel.data import printed_digits
from genkernel.data.printed_digits import render_printed_digits


def test_the_glyph_cache_stays_under_its_byte_bound_and_changes_no_image(monkeypatch):
    kwargs = dict(size=12, sizes=(0.8, 0.9), shifts=(0,), per_digit=4, seed=3)
    monkeypatch.setattr(printed_digits, "_glyph_cache", printed_digits.OrderedDict())
    cached = render_printed_digits(**kwargs)
    one_canvas = next(iter(printed_digits._glyph_cache.values())).nbytes
    assert len(printed_digits._glyph_cache) > 3
    # a bound of three canvases: the cache evicts the least recently used, the images are the same
    monkeypatch.setattr(printed_digits, "_glyph_cache", printed_digits.OrderedDict())
    monkeypatch.setattr(printed_digits, "_GLYPH_CACHE_BYTES", 3 * one_canvas)
    bounded = render_printed_digits(**kwargs)
    assert len(printed_digits._glyph_cache) == 3
    assert sum(a.nbytes for a in printed_digits._glyph_cache.values()) <= 3 * one_canvas
    for a, b in zip(cached, bounded):
        assert torch.equal(torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b)))


def test_a_cached_canvas_is_read_only_and_reused(monkeypatch):
    monkeypatch.setattr(printed_digits, "_glyph_cache", printed_digits.OrderedDict())
    render_printed_digits(size=8, per_digit=1, shifts=(0,), sizes=(0.9,))
    key = next(iter(printed_digits._glyph_cache))
    first = printed_digits._centred_glyph(*key)
    assert printed_digits._centred_glyph(*key) is first
    assert next(reversed(printed_digits._glyph_cache)) == key  # moved to the most recent end
    assert not first.flags.writeable
