"""Event signatures, decoding and the Ethereum source's config: pure logic, no node."""

from __future__ import annotations

import pytest
from eth_abi.abi import encode
from eth_utils.address import to_checksum_address
from hypothesis import given
from hypothesis import strategies as st

from connectors.ethereum import EthereumSourceConfig
from connectors.ethereum_abi import Decoder, parse_signature
from connectors.ethereum_rpc import redacted
from dispatcher.config import parse
from dispatcher.errors import ConfigError

TRANSFER = "Transfer(address indexed from, address indexed to, uint256 value)"
ALICE = "0x" + "ab" * 20
BOB = "0x" + "cd" * 20


def topic(address: str) -> str:
    return "0x" + "00" * 12 + address[2:]


def test_a_signature_becomes_an_abi_entry_with_canonical_types():
    entry = parse_signature("event Swap(address indexed sender, uint amount0In, int24 tick, bytes32 id);")
    assert entry["name"] == "Swap"
    assert [(p["type"], p["indexed"], p["name"]) for p in entry["inputs"]] == [
        ("address", True, "sender"), ("uint256", False, "amount0In"), ("int24", False, "tick"), ("bytes32", False, "id")]
    assert Decoder(parse_signature(TRANSFER)).topic == \
        "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"


@pytest.mark.parametrize("bad", ["Transfer", "Transfer(address indexed)x", "Transfer(adress from)",
                                 "Transfer(uint7 value)", "Transfer(address indexed from to)"])
def test_a_malformed_signature_says_what_is_wrong(bad):
    with pytest.raises(ValueError, match=r"Transfer|signature"):
        parse_signature(bad)


def test_arguments_are_decoded_json_safe():
    decoder = Decoder(parse_signature(TRANSFER))
    big = 2**60 + 1
    args = decoder.decode([decoder.topic, topic(ALICE), topic(BOB)], "0x" + encode(["uint256"], [big]).hex())
    assert args == {"from": to_checksum_address(ALICE), "to": to_checksum_address(BOB), "value": str(big)}
    assert args["from"] != ALICE  # checksummed: mixed case
    small = decoder.decode([decoder.topic, topic(ALICE), topic(BOB)], "0x" + encode(["uint256"], [42]).hex())
    assert small["value"] == 42


@given(st.binary(min_size=20, max_size=20), st.integers(0, 2**256 - 1), st.integers(0, 255), st.booleans(),
       st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_the_fast_path_for_common_words_decodes_as_eth_abi_does(address, wide, narrow, flag, raw, noise):
    """Addresses, uintN, bool and bytes32 are read from their words directly (eth-abi is 30 times slower):
    for clean words and for noise alike, the answer is eth-abi's, or a refusal where eth-abi refuses."""
    from eth_abi.abi import decode

    decoder = Decoder(parse_signature("E(address indexed a, uint8 indexed n, uint256 w, bool f, bytes32 r, uint8 x)"))
    types = ["uint256", "bool", "bytes32", "uint8"]

    def by_eth_abi(topics: list[str], data: bytes) -> dict[str, object] | None:
        try:
            a = decode(["address"], bytes.fromhex(topics[1][2:]), strict=False)[0]
            n = decode(["uint8"], bytes.fromhex(topics[2][2:]), strict=False)[0]
            w, f, r, x = decode(types, data, strict=False)
        except Exception:
            return None
        return {"a": to_checksum_address(a), "n": n, "w": w if w <= 2**53 else str(w), "f": f, "r": "0x" + r.hex(),
                "x": x}

    clean = encode(["uint8"], [narrow])
    for indexed in (clean, noise):
        for data in (encode(types, [wide, flag, raw, narrow]), encode(["uint256"], [wide]) + noise * 3):
            topics = [decoder.topic, "0x" + encode(["address"], ["0x" + address.hex()]).hex(), "0x" + indexed.hex()]
            expected = by_eth_abi(topics, data)
            try:
                assert decoder.decode(topics, "0x" + data.hex()) == expected
            except ValueError:
                assert expected is None, "refused a log eth-abi decodes"


def test_dynamic_and_array_arguments():
    decoder = Decoder(parse_signature("Note(string text, uint256[] values, bytes blob)"))
    data = encode(["string", "uint256[]", "bytes"], ["héllo", [1, 2**60], b"\x01\x02"])
    assert decoder.decode([decoder.topic], "0x" + data.hex()) == {
        "text": "héllo", "values": [1, str(2**60)], "blob": "0x0102"}


def test_a_log_of_another_shape_is_refused_not_misread():
    """An ERC-721 Transfer (the token id indexed too) has the same topic 0 as an ERC-20 Transfer."""
    decoder = Decoder(parse_signature(TRANSFER))
    with pytest.raises(ValueError, match="3 indexed topics"):
        decoder.decode([decoder.topic, topic(ALICE), topic(BOB), "0x" + "00" * 31 + "07"], "0x")
    with pytest.raises(ValueError, match="cannot decode"):
        decoder.decode([decoder.topic, topic(ALICE), topic(BOB)], "0x1234")


GOOD = """
[functions.f]
image = "x"

[triggers.t]
function = "f"
source = { kind = "ethereum", rpc_url = "http://127.0.0.1:8545", events = ["TRANSFER"] }
""".replace("TRANSFER", TRANSFER)


@pytest.mark.parametrize(("change", "path"), [
    (("events = [", 'addresses = ["0x12"], events = ['), "triggers.t.source.addresses"),
    (("rpc_url = \"http://127.0.0.1:8545\", ", ""), "triggers.t.source"),
    (("http://127.0.0.1:8545", "ftp://127.0.0.1:8545"), "triggers.t.source.rpc_url"),
    ((TRANSFER, "Transfer(adress from)"), "triggers.t.source.events"),
    (("events = [", "confirmations = -1, events = ["), "triggers.t.source.confirmations"),
    (("events = [", 'abi_file = "/nonexistent.json", events = ['), "triggers.t.source.abi_file"),
])
def test_a_bad_ethereum_config_names_its_key(change, path):
    import tomllib

    with pytest.raises(ConfigError) as caught:
        parse(tomllib.loads(GOOD.replace(*change)))
    assert [p for p, _ in caught.value.problems] == [path], caught.value.problems


def test_an_rpc_url_with_a_key_comes_from_the_environment_and_never_shows(monkeypatch):
    monkeypatch.setenv("ES_TEST_RPC", "https://user:secret@node.example/v3/KEY123")
    config = EthereumSourceConfig(kind="ethereum", rpc_url_env="ES_TEST_RPC", events=[TRANSFER])
    assert config.endpoints() == ["https://user:secret@node.example/v3/KEY123"]
    shown = redacted(config.endpoints()[0])
    assert "KEY123" not in shown and "secret" not in shown and "node.example" in shown


def test_answers_of_the_wrong_shape_are_malformed_naming_what_is_wrong():
    from connectors.ethereum_rpc import Malformed, block_of, logs_of

    good = {"blockHash": "0x" + "a" * 64, "transactionHash": "0x" + "b" * 64, "address": "0x" + "c" * 40,
            "data": "0x", "blockNumber": "0x10", "logIndex": "0x0", "topics": ["0x" + "d" * 64]}
    assert logs_of([good], "e", 16, 16) == [good]
    cases = [("garbage", "not a list of logs"), ([1], "a log that is int"),
             ([{**good, "topics": None}], "without its topics"), ([{**good, "logIndex": 3}], "logIndex is int"),
             ([{**good, "blockNumber": "0x11"}], "outside 16-16")]
    for answer, said in cases:
        with pytest.raises(Malformed, match=said):
            logs_of(answer, "e", 16, 16)
    assert block_of(None, "e") is None
    with pytest.raises(Malformed, match="not a block"):
        block_of("0x1", "e")
    with pytest.raises(Malformed, match="without a hash"):
        block_of({"number": "0x1", "hash": "nope"}, "e")


def test_a_providers_suggested_range_is_found_in_its_refusal():
    from connectors.ethereum_rpc import SUGGESTED_RANGE

    alchemy = ("Log response size exceeded. You can make eth_getLogs requests with up to a 2K block range and no limit "
               "on the response size, or you can request any block range with a cap of 10K logs in the response. "
               "Based on your parameters, this block range should work: [0x1c2a1d, 0x1c2f6b]")
    found = SUGGESTED_RANGE.search(alchemy)
    assert found and int(found[2], 16) - int(found[1], 16) + 1 == 1359
    assert SUGGESTED_RANGE.search("query returned more than 10000 results") is None


def test_a_blooms_bits_say_which_address_and_topic_a_block_may_hold():
    from eth_utils.crypto import keccak

    from connectors.ethereum_rpc import bloom_may_hold

    address, topic = "0x" + "11" * 20, "0x" + "22" * 32
    bits = 0
    for item in (address, topic):
        digest = keccak(bytes.fromhex(item[2:]))
        for i in (0, 2, 4):
            bits |= 1 << (((digest[i] << 8) | digest[i + 1]) & 2047)
    bloom = "0x" + f"{bits:0512x}"
    assert bloom_may_hold(bloom, [address], [topic]) and bloom_may_hold(bloom, [], [topic])
    assert not bloom_may_hold(bloom, ["0x" + "33" * 20], [topic])
    assert not bloom_may_hold("0x" + "0" * 512, [], [topic])
