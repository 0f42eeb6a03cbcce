"""Data for training and evaluation: degradation models that turn clean volumes into inputs.

Import from the submodules (``medgen.data.degrade`` and friends) so that importing this
package stays cheap.
"""
