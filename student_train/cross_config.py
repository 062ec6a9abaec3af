"""student-train's settings of a student whose tokenizer is not the store's
(student_train/cross_tokenizer.py sets the loss and CrossCollate up from them); config.py
declares them in FIELDS with the rest. `cross_fields_in_effect` says which of them act on a
run (a resume ignores differences in the others)."""

from __future__ import annotations

from logitstore.toolkit.options import Field, between

CROSS_LOSSES = ("pkl", "uld")
CE_WITHOUT_TARGET = ("full", "blend")

CROSS_FIELDS: dict[str, Field] = {
    "cross_loss": Field("str", "pkl", choices=CROSS_LOSSES,
                        help="A student whose tokenizer is not the store's: pkl = the divergence "
                             "on the teacher's top-k mapped onto the student's vocabulary; "
                             "uld = sorted-probability distance (no map)."),
    "ce_without_target": Field("str", "full", choices=CE_WITHOUT_TARGET,
                               help="The CE weight at a position no signal gives a KD target "
                                    "(skipped, not aligned): full = 1, the whole loss there; "
                                    "blend = 1 - alpha, as at the positions with a target."),
    "min_mapped_share": Field("float", 0.5, between(0, 1),
                              help="pkl: skip (and count) positions whose teacher top-k mass "
                                   "maps onto the student's vocabulary less than this (inside "
                                   "a teacher token: whose conditioned share is less)."),
    "inside_token_targets": Field("bool", True, absent=False,  # runs saved before: skipped
                                  help="pkl: student positions inside a teacher token get the "
                                       "teacher's top-k at that token's start conditioned on "
                                       "the student's pieces since (false: skipped)."),
    "inside_other_bin": Field("bool", True, absent=False,  # runs saved before: renormalised
                              help="pkl: inside-token targets keep the mass of teacher tokens "
                                   "ending where the student stands as an 'other' bin "
                                   "(false: renormalised over the continuing ones)."),
    "chained_token_targets": Field("bool", True, absent=False,  # runs saved before: off
                                   help="pkl: an aligned student token that spans several "
                                        "teacher tokens gets the teacher's probability of "
                                        "them in a row (their stored log-probs) instead of "
                                        "none (false: the first teacher token's piece only)."),
    "skip_dummy_prefix_pairs": Field("bool", True, absent=False,  # runs saved before: kept
                                     help="pkl: skip (and count) an aligned pair where one "
                                          "side's next token carries a prefix space the text "
                                          "lacks (SentencePiece's dummy '▁'): the map's target "
                                          "there is another spelling (false: kept)."),
    "skip_unchained_pairs": Field("bool", True, absent=False,  # runs saved before: kept
                                  help="pkl with chained targets: skip (and count) an aligned "
                                       "student token spanning several teacher tokens whose "
                                       "chain cannot be read (a teacher token outside the "
                                       "stored top-k, or the student token ending inside "
                                       "one): the plain mapped target there gives the "
                                       "student's own next token no mass (false: kept)."),
}


def cross_fields_in_effect(values, across: bool) -> set[str]:
    """The CROSS_FIELDS keys that change a run whose resolved settings are `values` (a
    mapping): none when the run is not across tokenizers (`across` False), `cross_loss` and
    `ce_without_target` alone under uld (the rest are pkl's), and under pkl all but the
    switches their parent turns off (`inside_other_bin` without inside targets,
    `skip_unchained_pairs` without chains)."""
    if not across:
        return set()
    if values["cross_loss"] != "pkl":
        return {"cross_loss", "ce_without_target"}
    acting = set(CROSS_FIELDS)
    if not values["inside_token_targets"]:
        acting.discard("inside_other_bin")
    if not values["chained_token_targets"]:
        acting.discard("skip_unchained_pairs")
    return acting
