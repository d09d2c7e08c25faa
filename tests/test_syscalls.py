import numpy as np
import pytest

from bam.syscalls import canonical_ids, id_of, name_of, number_of


def test_i386_and_x86_64_numbers_meet_in_one_vocabulary():
    # exit_group is 252 on i386 and 231 on x86_64: both must map to the same canonical id.
    a = canonical_ids([252], "i386")[0]
    b = canonical_ids([231], "x86_64")[0]
    assert a == b == id_of("exit_group")
    assert name_of(int(a)) == "exit_group"


def test_unnamed_numbers_stay_distinct_and_named():
    ids = canonical_ids([1000, 1001], "x86_64")
    assert ids[0] != ids[1]
    assert name_of(int(ids[0])) == "x86_64#1000"


def test_out_of_range_number_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        canonical_ids(np.array([5000]), "i386")


def test_unknown_name_is_named_in_the_error():
    with pytest.raises(KeyError, match="no_such_call"):
        id_of("no_such_call")
    assert number_of("read", "x86_64") == 0
