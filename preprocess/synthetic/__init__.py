"""Built-in BraTS-format data, the project's stand-in for real releases (none exists here).

cases.py     the common case format and its writer (release layout, LPS storage, name mapping)
toy.py       an ellipsoid brain with a concentric glioma: fast, for tiny test shapes
releases.py  toy cases of every release of the table, in its layout (MSD's 4D files included)
realistic.py template anatomy, glioma-like tumours, confounders, acquisition and rater nuisances:
             hard enough to rank recipes; its models are anatomy.py, tumour.py, acquisition.py,
             rater.py, on the random fields of fields.py
"""
