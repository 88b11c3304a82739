-- Request metrics: the same DDL runs on a ClickHouse server (clickhouse-connect) and
-- on chDB (embedded). Statements are separated by a line holding only ";".
--
-- requests_raw: the exporter writes one row per request per batch, assembled from
-- that request's lifecycle events in the batch. Every column merges with an
-- idempotent function (min, max), so rows for one request_id written in different
-- batches, in any order, or written twice (a replayed event after an exporter crash)
-- collapse into the same single row: nothing is double counted. ClickHouse merges
-- them in the background; queries merge them with GROUP BY request_id (the
-- `requests` view), so results never depend on when merges ran.

CREATE TABLE IF NOT EXISTS requests_raw
(
    request_id        String,
    model             SimpleAggregateFunction(max, LowCardinality(String)),
    user              SimpleAggregateFunction(max, String),
    tier              SimpleAggregateFunction(max, LowCardinality(String)),
    claimed_by        SimpleAggregateFunction(max, String),
    released_by       SimpleAggregateFunction(max, String),
    attempts          SimpleAggregateFunction(max, UInt8),
    prompt_tokens     SimpleAggregateFunction(max, UInt32),
    max_tokens        SimpleAggregateFunction(max, UInt32),
    completion_tokens SimpleAggregateFunction(max, UInt32),
    kv_reused_tokens  SimpleAggregateFunction(max, UInt32),
    batch_size        SimpleAggregateFunction(max, UInt16),
    error_type        SimpleAggregateFunction(max, String),
    preemptions       SimpleAggregateFunction(max, UInt16),
    preempted_ms      SimpleAggregateFunction(max, UInt32),
    enqueued_at       SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    claimed_at        SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    first_token_at    SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    finished_at       SimpleAggregateFunction(max, Nullable(DateTime64(6, 'UTC'))),
    failed_at         SimpleAggregateFunction(max, Nullable(DateTime64(6, 'UTC'))),
    cancelled_at      SimpleAggregateFunction(max, Nullable(DateTime64(6, 'UTC'))),
    rejected_at       SimpleAggregateFunction(max, Nullable(DateTime64(6, 'UTC'))),
    released_at       SimpleAggregateFunction(max, Nullable(DateTime64(6, 'UTC'))),
    updated_at        SimpleAggregateFunction(max, DateTime64(6, 'UTC'))
)
ENGINE = AggregatingMergeTree
ORDER BY request_id
;
-- Columns added after the first release: a store created before them gains them here.
ALTER TABLE requests_raw ADD COLUMN IF NOT EXISTS preemptions SimpleAggregateFunction(max, UInt16) AFTER error_type
;
ALTER TABLE requests_raw ADD COLUMN IF NOT EXISTS preempted_ms SimpleAggregateFunction(max, UInt32) AFTER preemptions
;
-- One row per request, with the derived timings. Status: what the client saw
-- (the API's terminal event); when the API never reported one (it died), the
-- worker's release decides. Seconds are float seconds.
CREATE OR REPLACE VIEW requests AS
SELECT
    request_id,
    r_model AS model,
    r_user AS user,
    r_tier AS tier,
    if(r_released_by != '', r_released_by, r_claimed_by) AS worker,
    multiIf(r_rejected_at IS NOT NULL, 'rejected',
            r_cancelled_at IS NOT NULL, 'cancelled',
            r_failed_at IS NOT NULL, 'failed',
            r_finished_at IS NOT NULL, 'finished',
            r_released_at IS NULL, 'running',
            r_error_type = '', 'finished',
            r_error_type = 'aborted', 'cancelled',
            'failed') AS status,
    r_prompt_tokens AS prompt_tokens,
    r_max_tokens AS max_tokens,
    r_completion_tokens AS completion_tokens,
    toFloat64(r_claimed_at) - toFloat64(r_enqueued_at) AS queue_wait_s,
    toFloat64(r_first_token_at) - toFloat64(r_enqueued_at) AS ttft_s,
    toFloat64(coalesce(r_rejected_at, r_cancelled_at, r_failed_at, r_finished_at, r_released_at))
        - toFloat64(r_enqueued_at) AS latency_s,
    if(r_completion_tokens > 1 AND toFloat64(r_end_at) > toFloat64(r_first_token_at),
       (r_completion_tokens - 1) / (toFloat64(r_end_at) - toFloat64(r_first_token_at)), NULL) AS tokens_per_s,
    r_batch_size AS batch_size,
    r_kv_reused_tokens AS kv_reused_tokens,
    if(status = 'finished', '', r_error_type) AS error_type,
    r_attempts AS attempts,
    r_preemptions AS preemptions,
    r_preempted_ms / 1000 AS preempted_s,
    r_enqueued_at AS enqueued_at,
    coalesce(r_rejected_at, r_cancelled_at, r_failed_at, r_finished_at, r_released_at) AS ended_at
FROM
(
    SELECT
        request_id,
        max(model) AS r_model,
        max(user) AS r_user,
        max(tier) AS r_tier,
        max(claimed_by) AS r_claimed_by,
        max(released_by) AS r_released_by,
        max(attempts) AS r_attempts,
        max(preemptions) AS r_preemptions,
        max(preempted_ms) AS r_preempted_ms,
        max(prompt_tokens) AS r_prompt_tokens,
        max(max_tokens) AS r_max_tokens,
        max(completion_tokens) AS r_completion_tokens,
        max(kv_reused_tokens) AS r_kv_reused_tokens,
        max(batch_size) AS r_batch_size,
        max(error_type) AS r_error_type,
        min(enqueued_at) AS r_enqueued_at,
        min(claimed_at) AS r_claimed_at,
        min(first_token_at) AS r_first_token_at,
        max(finished_at) AS r_finished_at,
        max(failed_at) AS r_failed_at,
        max(cancelled_at) AS r_cancelled_at,
        max(rejected_at) AS r_rejected_at,
        max(released_at) AS r_released_at,
        coalesce(max(finished_at), max(released_at)) AS r_end_at
    FROM requests_raw
    GROUP BY request_id
)
