"""Reading whole photos: a text detector in front of the word recognizer.

``detector`` finds text lines (PP-OCRv6's DB detector, the ``detect`` extra), ``geometry``
rectifies quadrilaterals and orders them for reading, ``words`` cuts lines into words at the
spaces PP-OCRv6's line reader finds (and where it ran words together), ``photo`` puts it
together (:func:`runtime.detect.photo.read_photo`).
Nothing here is imported when only word crops are read.
"""

from runtime.detect.settings import DetectorSettings, DetectUnavailable, detector_settings

__all__ = ["DetectUnavailable", "DetectorSettings", "detector_settings"]
