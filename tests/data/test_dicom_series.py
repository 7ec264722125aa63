"""``dicom_series``: the geometry verdicts on a series' headers, one reason at a time."""

from __future__ import annotations

import pytest

from medssl.data.dicom_series import Header, check_series, lps_affine

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _headers(positions, **over) -> list:
    base = {"series": "s", "patient": "p", "orientation": AXIAL, "pixel_spacing": (1.0, 1.0),
            "rows": 4, "cols": 4}
    return [Header(path=f"f{i}.dcm", position=tuple(map(float, pos)),
                   **{**base, **{k: v[i] if isinstance(v, list) else v for k, v in over.items()}})
            for i, pos in enumerate(positions)]


@pytest.mark.parametrize(("positions", "over", "reason"), [
    ([(0, 0, z) for z in (0, 2.5, 5, 7.5)], {}, None),
    ([(0, 0, z) for z in (7.5, 0, 5, 2.5)], {}, None),                      # any file order
    ([(0, 0, z) for z in (0, 2.5, 5.0004, 7.5)], {}, None),                 # decimal noise
    ([(0, 0, z) for z in (0, 2.5, 7.5, 12.5)], {}, "missing_slices"),
    ([(0, 0, z) for z in (0, 2.5, 5.6, 7.5)], {}, "inconsistent_spacing"),
    ([(0, 0, z) for z in (0, 2.5, 2.5, 5)], {}, "duplicate_slices"),
    ([(0, z / 5, z) for z in (0, 2.5, 5, 7.5)], {}, "gantry_tilt"),
    ([(0, 0, z) for z in (0, 2.5)], {}, "too_few_slices"),
    ([(0, 0, z) for z in (0, 2.5, 5)], {"patient": ["p", "p", "q"]}, "mixed_patients"),
    ([(0, 0, z) for z in (0, 2.5, 5)], {"rows": [4, 4, 8]}, "mixed_dimensions"),
    ([(0, 0, z) for z in (0, 2.5, 5)], {"pixel_spacing": [(1, 1), (1, 1), (1, 1.2)]},
     "inconsistent_spacing"),
    ([(0, 0, z) for z in (0, 2.5, 5)], {"orientation": [AXIAL, AXIAL, (0, 1, 0, 0, 0, -1)]},
     "mixed_orientation"),
    ([(0, 0, z) for z in (0, 2.5, 5)], {"frames": [1, 1, 2]}, "multiframe"),
    ([(0, 0, z) for z in (0, 2.5, 5)], {"orientation": [AXIAL, None, AXIAL]},
     "missing_geometry"),
])
def test_series_geometry_checks(positions, over, reason):
    series = check_series(_headers(positions, **over))
    assert series.reason == reason
    if reason is None:  # sorted along the normal, whatever the file order
        z = [h.position[2] for h in series.headers]
        assert z == sorted(z)



def test_affine_follows_the_dicom_pixel_equation():
    # PS3.3 C.7.6.2.1.1: column index along the row cosine at PixelSpacing[1], row index along
    # the column cosine at PixelSpacing[0], slices along row x column at the step.
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    headers = [Header(path=f"{i}", series="s", patient="p", position=(5.0, 10.0 - 3 * i, 7.0),
                      orientation=coronal, pixel_spacing=(0.5, 0.8), rows=4, cols=4)
               for i in (2, 0, 1)]
    series = check_series(headers)
    assert series.reason is None and [h.path for h in series.headers] == ["2", "1", "0"]
    affine = lps_affine(series)
    assert affine[:3, 0].tolist() == [0.8, 0.0, 0.0] and affine[:3, 1].tolist() == [0, 0, -0.5]
    assert affine[:3, 2].tolist() == [0.0, 3.0, 0.0] and affine[:3, 3].tolist() == [5, 4, 7]
