-- The audit trail: an append-only, SM3 hash-chained record of every
-- internal/admin RPC and every read of personal data (who, what, when,
-- outcome). fuelcard_server/audit.py writes it and verifies it.
--
-- Record n is bound to record n-1:
--   hash(n) = SM3(prev_hash(n) || canonical(n)),  prev_hash(n) = hash(n-1)
--   prev_hash(1) = 32 zero bytes
--   canonical(n) = 'FCAUDIT1' || int8(id) || int8(created_at, microseconds
--                  since 1970-01-01 UTC) || lp(actor) || lp(method)
--                  || lp(target as text, '' if none) || lp(outcome)
--   lp(s) = int4(octet length of s in UTF-8) || s in UTF-8; integers are
--   big-endian (int8send/int4send).
-- So an edited record no longer matches its hash, a deleted one leaves a gap
-- in the ids and a broken link, and a moved one breaks both.
--
-- PostgreSQL has no SM3 (and pgcrypto is not in every installation), so
-- fc.sm3 implements GB/T 32905 here. The chain is extended inside the database,
-- under one advisory lock, so an audited RPC costs one round trip and two
-- writers (two worker processes) can never fork the chain. `fuelcard audit
-- verify` recomputes every hash with the C-backed SM3 of fuelcard_server.gm,
-- so the two implementations check each other.
--
-- Repeatable: `fuelcard migrate` re-applies this whole file when it changes. Each function is
-- defined here and nowhere else; a changed signature needs a DROP FUNCTION in a numbered migration.

-- The audit trail: an append-only, SM3 hash-chained record of every
-- internal/admin RPC and every read of personal data (who, what, when,
-- outcome). fuelcard_server/audit.py writes it and verifies it.
--
-- Record n is bound to record n-1:
--   hash(n) = SM3(prev_hash(n) || canonical(n)),  prev_hash(n) = hash(n-1)
--   prev_hash(1) = 32 zero bytes
--   canonical(n) = 'FCAUDIT1' || int8(id) || int8(created_at, microseconds
--                  since 1970-01-01 UTC) || lp(actor) || lp(method)
--                  || lp(target as text, '' if none) || lp(outcome)
--   lp(s) = int4(octet length of s in UTF-8) || s in UTF-8; integers are
--   big-endian (int8send/int4send).
-- So an edited record no longer matches its hash, a deleted one leaves a gap
-- in the ids and a broken link, and a moved one breaks both.
--
-- PostgreSQL has no SM3 (and pgcrypto is not in every installation), so
-- fc.sm3 implements GB/T 32905 here. The chain is extended inside the database,
-- under one advisory lock, so an audited RPC costs one round trip and two
-- writers (two worker processes) can never fork the chain. `fuelcard audit
-- verify` recomputes every hash with the C-backed SM3 of fuelcard_server.gm,
-- so the two implementations check each other.

-- SM3 (GB/T 32905-2016) on 32-bit words held in bigints. About 70 us per
-- 64-byte block; an audit record is 3-5 blocks.
CREATE OR REPLACE FUNCTION fc.sm3(p_data bytea) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    m   CONSTANT bigint := 4294967295;
    -- T_j rotated left by (j mod 32), j = 0..63
    t   CONSTANT bigint[] := '[0:63]={2043430169,4086860338,3878753381,3462539467,2630111639,965255983,1930511966,3861023932,3427080569,2559193843,823420391,1646840782,3293681564,2292395833,289824371,579648742,2643098247,991229199,1982458398,3964916796,3634866297,2974765299,1654563303,3309126606,2323285917,351604539,703209078,1406418156,2812836312,1330705329,2661410658,1027854021,2055708042,4111416084,3927864873,3560762451,2826557607,1358147919,2716295838,1137624381,2275248762,255530229,511060458,1022120916,2044241832,4088483664,3882000033,3469032771,2643098247,991229199,1982458398,3964916796,3634866297,2974765299,1654563303,3309126606,2323285917,351604539,703209078,1406418156,2812836312,1330705329,2661410658,1027854021}';
    n   bigint := octet_length(p_data);
    msg bytea;
    w   bigint[] := array_fill(0::bigint, ARRAY[68], ARRAY[0]);
    -- the initial value IV
    v0 bigint := 1937774191; v1 bigint := 1226093241; v2 bigint := 388252375;
    v3 bigint := 3666478592; v4 bigint := 2842636476; v5 bigint := 372324522;
    v6 bigint := 3817729613; v7 bigint := 2969243214;
    a bigint; b bigint; c bigint; d bigint; e bigint; f bigint; g bigint; h bigint;
    x bigint; a12 bigint; ss1 bigint; tt1 bigint; tt2 bigint; o integer;
BEGIN
    -- padding: 0x80, zeros up to 56 mod 64, the length in bits as int8
    msg := p_data || '\x80'::bytea
           || decode(repeat('00', (((55 - n) % 64 + 64) % 64)::integer), 'hex')
           || int8send(n * 8);
    FOR blk IN 0 .. octet_length(msg) / 64 - 1 LOOP
        -- message expansion: W0..W67 (W'j = Wj xor Wj+4 is formed inline)
        FOR j IN 0 .. 15 LOOP
            o := blk * 64 + j * 4;
            w[j] := (get_byte(msg, o)::bigint << 24) | (get_byte(msg, o + 1) << 16)
                    | (get_byte(msg, o + 2) << 8) | get_byte(msg, o + 3);
        END LOOP;
        FOR j IN 16 .. 67 LOOP
            x := w[j - 16] # w[j - 9] # (((w[j - 3] << 15) | (w[j - 3] >> 17)) & m);
            w[j] := x # (((x << 15) | (x >> 17)) & m) # (((x << 23) | (x >> 9)) & m)  -- P1
                    # (((w[j - 13] << 7) | (w[j - 13] >> 25)) & m) # w[j - 6];
        END LOOP;
        -- compression
        a := v0; b := v1; c := v2; d := v3; e := v4; f := v5; g := v6; h := v7;
        FOR j IN 0 .. 63 LOOP
            a12 := ((a << 12) | (a >> 20)) & m;
            ss1 := (a12 + e + t[j]) & m;
            ss1 := ((ss1 << 7) | (ss1 >> 25)) & m;
            IF j < 16 THEN
                tt1 := ((a # b # c) + d + (ss1 # a12) + (w[j] # w[j + 4])) & m;
                tt2 := ((e # f # g) + h + ss1 + w[j]) & m;
            ELSE
                tt1 := (((a & b) | (a & c) | (b & c)) + d + (ss1 # a12) + (w[j] # w[j + 4])) & m;
                tt2 := (((e & f) | (~e & g)) + h + ss1 + w[j]) & m;
            END IF;
            d := c; c := ((b << 9) | (b >> 23)) & m; b := a; a := tt1;
            h := g; g := ((f << 19) | (f >> 13)) & m; f := e;
            e := tt2 # (((tt2 << 9) | (tt2 >> 23)) & m) # (((tt2 << 17) | (tt2 >> 15)) & m);  -- P0
        END LOOP;
        v0 := v0 # a; v1 := v1 # b; v2 := v2 # c; v3 := v3 # d;
        v4 := v4 # e; v5 := v5 # f; v6 := v6 # g; v7 := v7 # h;
    END LOOP;
    RETURN decode(lpad(to_hex(v0), 8, '0') || lpad(to_hex(v1), 8, '0') || lpad(to_hex(v2), 8, '0')
                  || lpad(to_hex(v3), 8, '0') || lpad(to_hex(v4), 8, '0')
                  || lpad(to_hex(v5), 8, '0') || lpad(to_hex(v6), 8, '0')
                  || lpad(to_hex(v7), 8, '0'), 'hex');
END $$;

-- The record's canonical encoding (see the top of this file).
CREATE OR REPLACE FUNCTION fc.audit_canonical(p_id bigint, p_created_at timestamptz, p_actor text,
                                   p_method text, p_target uuid, p_outcome text) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $$
    SELECT convert_to('FCAUDIT1', 'UTF8') || int8send(p_id)
           || int8send((extract(epoch FROM p_created_at) * 1000000)::bigint)
           || int4send(octet_length(convert_to(p_actor, 'UTF8'))) || convert_to(p_actor, 'UTF8')
           || int4send(octet_length(convert_to(p_method, 'UTF8'))) || convert_to(p_method, 'UTF8')
           || int4send(octet_length(convert_to(coalesce(p_target::text, ''), 'UTF8')))
           || convert_to(coalesce(p_target::text, ''), 'UTF8')
           || int4send(octet_length(convert_to(p_outcome, 'UTF8'))) || convert_to(p_outcome, 'UTF8')
$$;

-- Appends one record and returns its id. p_lock is the chain's advisory lock
-- (locks.AUDIT_LOCK): held to the end of the transaction, it serialises every
-- append, so each one reads the committed head and extends it. The time is
-- the database's, taken under the lock, so ids and times rise together.
CREATE OR REPLACE FUNCTION fc.audit_append(p_lock bigint, p_actor text, p_method text, p_target uuid,
                                p_outcome text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id   bigint;
    v_prev bytea;
    v_now  timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock);
    SELECT l.id, l.hash INTO v_id, v_prev FROM fc.audit_log l ORDER BY l.id DESC LIMIT 1;
    IF NOT FOUND THEN
        v_id := 0;
        v_prev := decode(repeat('00', 32), 'hex');
    END IF;
    v_id := v_id + 1;
    -- microseconds: what timestamptz stores, so the hash covers the stored value
    v_now := date_trunc('microseconds', clock_timestamp());
    INSERT INTO fc.audit_log (id, created_at, actor, method, target, outcome, prev_hash, hash)
    VALUES (v_id, v_now, p_actor, p_method, p_target, p_outcome, v_prev,
            fc.sm3(v_prev || fc.audit_canonical(v_id, v_now, p_actor, p_method, p_target,
                                                p_outcome)));
    RETURN v_id;
END $$;
