from broker import keys, messages
from broker.messages import ErrorEvent, GenerateRequest, SamplingParams, Tier, TokenEvent


def test_request_roundtrip_keeps_types():
    req = GenerateRequest(
        id="r1", model="m", prompt_token_ids=[1, 2, 3], reply_to="is:reply:a", user="u", tier=Tier.LOW,
        params=SamplingParams(max_tokens=7, stop=("a", "bc"), stop_token_ids=(5,), seed=3, n=2),
        session_key="k", prefix_hashes=["ab", "cd"], trace={"traceparent": "00-ab-cd-01"},
    )
    back = messages.decode(messages.encode(req))
    assert back == req
    assert isinstance(back.params.stop, tuple) and back.tier is Tier.LOW
    assert back.cost == 3 + 7 * 2


def test_batch_roundtrip_mixed_events():
    evs = [TokenEvent("r1", 0, 4, [9, 10], text="hé", finish_reason="stop"), ErrorEvent("r2", "boom", status=503)]
    assert messages.decode_batch(messages.encode_batch(evs)) == evs


def test_keys_share_the_model_hash_tag():
    model = "smollm2-135m"
    touched = [keys.request(model, "r"), keys.output_log(model, "r"), keys.user_queue(model, "high", "u"),
               keys.tier_users(model, "low"), keys.tier_age(model, "normal"), keys.tier_state(model),
               keys.user_counts(model), keys.leases(model), keys.doorbell(model), keys.drain(model)]
    assert all("{smollm2-135m}" in k for k in touched)
    assert len(set(touched)) == len(touched)
    assert all(k.startswith("is:") for k in touched + [keys.WORKERS, keys.worker("w"), keys.reply_channel("a")])


def test_tier_rank_order():
    assert Tier.HIGH.rank > Tier.NORMAL.rank > Tier.LOW.rank


def test_media_messages_roundtrip_with_their_types():
    from broker.messages import AudioChunk, JobEvent, MediaRequest, SpeechRequest, VisionRequest

    vision = VisionRequest(id="v", model="vl", prompt_token_ids=[1, 2], params=SamplingParams(stop=("x",)),
                           reply_to="c", tier=Tier.HIGH, images=["aGk="])
    speech = SpeechRequest(id="s", model="k", input="Hello there.", voice="af_heart", reply_to="c", speed=1.5)
    media = MediaRequest(id="m", model="sd", prompt="a cat", n=2, width=64, height=32, tier=Tier.LOW)
    for msg in (vision, speech, media):
        back = messages.decode(messages.encode(msg))
        assert back == msg and type(back) is type(msg)
    assert messages.decode(messages.encode(vision)).params.stop == ("x",)
    assert speech.cost == len("Hello there.") and media.tier is Tier.LOW
    events = [AudioChunk("s", 0, 24_000, "AAA=", final=True), JobEvent("m", "succeeded")]
    assert messages.decode_batch(messages.encode_batch(events)) == events


def test_joined_encodings_are_the_batch_encoding():
    msgs = [TokenEvent("a", 0, 3, [5, 6], text="hé\n", logprobs=[{"token": "x", "logprob": -0.5}]),
            ErrorEvent("b", "bad", code="engine_error")]
    joined = messages.join_encoded([messages.encode(m) for m in msgs])
    assert joined == messages.encode_batch(msgs) and messages.decode_batch(joined) == msgs
    assert messages.join_encoded([]) == messages.encode_batch([])
