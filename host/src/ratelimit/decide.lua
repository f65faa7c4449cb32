-- Decisions of rate limits for client keys, atomically, on the Redis
-- server's clock. The same arithmetic as ratelimit/local.rs, in
-- microseconds. One call decides a whole batch of requests (every key of
-- one call is in the same slot on a cluster, or the server is a single one),
-- so a node pays for one command, not one per request.
--
-- KEYS[i]  the state of the limit for the i-th request's client key.
-- ARGV[i]  that request's limit, or with a single ARGV entry the limit of
--          every request, as space-separated numbers:
--          "1 interval burst queue lease": token or leaky bucket (GCRA),
--              with the interval between requests in us (with a fraction).
--          "2 window limit": fixed window of window us;
--          "3 window limit": sliding window of window us;
--          "4 interval": give back the place of a queued request of a leaky
--              bucket whose client went away.
--
-- A bucket's lease above 1 takes up to that many requests at once when the
-- request is admitted, never more than the bucket has room for. The node
-- admits them without calling again. The queue is 0 then.
--
-- Returns one string: the decisions in the order of KEYS, separated by ",".
-- A decision is "allowed limit remaining reset_us retry_after_us delay_us
-- granted" (allowed is 0 or 1; granted is the requests taken: 0 when
-- refused, 1 without a lease), a give back the empty string. One string of
-- integers costs a client less to parse than arrays of integer replies.
-- A key whose state cannot be read, such as one of another type, gets "E "
-- and Redis's error instead, so that it fails its own request only.

-- Needed before Redis 5 to write after reading TIME; a no-op since.
if redis.replicate_commands then
    pcall(redis.replicate_commands)
end

-- Formats a decision; %d truncates like Redis's conversion of a Lua number
-- to an integer reply.
local function decision(allowed, limit, remaining, reset, retry, delay, granted)
    return string.format('%d %d %d %d %d %d %d', allowed, limit, remaining, reset, retry, delay,
        granted or allowed)
end

-- The requests an admitted request takes: itself and, under a lease, up to
-- lease - 1 more of the `remaining` it leaves.
local function take(lease, remaining)
    return 1 + math.max(0, math.min(lease - 1, remaining))
end

-- The state of each key this call read, and how to write it back. A batch
-- often has several requests for one key (a busy client, or a limit keyed
-- by route), so each key is read once and written once, at the end.
-- A bucket's state is its theoretical arrival time, `false` once deleted;
-- a window's is its fields w, c and p.
local tats = {}
local windows = {}
-- key -> expiry in ms, for the keys to write back.
local expiries = {}

local function load_tat(key)
    local tat = tats[key]
    if tat == nil then
        tat = tonumber(redis.call('GET', key)) or false
        tats[key] = tat
    end
    return tat or nil
end

local function store_tat(key, tat, expiry)
    tats[key] = tat or false
    expiries[key] = expiry
end

local function load_window(key)
    local state = windows[key]
    if not state then
        local stored = redis.call('HMGET', key, 'w', 'c', 'p')
        state = {
            w = tonumber(stored[1]),
            c = tonumber(stored[2]) or 0,
            p = tonumber(stored[3]) or 0,
        }
        windows[key] = state
    end
    return state
end

local function store_window(key, w, c, p, expiry)
    local state = windows[key]
    state.w, state.c, state.p = w, c, p
    expiries[key] = expiry
end

-- Writes every changed key back, once.
local function write_back()
    for key, expiry in pairs(expiries) do
        local state = windows[key]
        if state then
            redis.call('HSET', key, 'w', state.w, 'c', state.c, 'p', state.p)
            redis.call('PEXPIRE', key, expiry)
        elseif tats[key] then
            redis.call('SET', key, string.format('%.17g', tats[key]), 'PX', expiry)
        else
            redis.call('DEL', key)
        end
    end
end

-- Decides one request of the limit `spec` (the numbers of its ARGV entry)
-- for the state at `key`.
local function decide(key, spec, now)
    local algorithm = spec[1]

    if algorithm == 4 then
        -- Moves the bucket's theoretical arrival time back by one interval, so
        -- the next request takes the place; never before now.
        local tat = load_tat(key)
        if tat then
            tat = tat - spec[2]
            if tat <= now then
                store_tat(key, nil, 0)
            else
                store_tat(key, tat, math.ceil((tat - now) / 1000) + 1000)
            end
        end
        return ''
    end

    if algorithm == 1 then
        local t = spec[2]
        local burst = spec[3]
        local queue = spec[4]
        local lease = spec[5]
        local capacity = burst + queue
        local tat = load_tat(key)
        if not tat or tat < now then
            tat = now
        end
        local new_tat = tat + t
        local ahead = new_tat - now
        local room = capacity * t
        if ahead > room then
            return decision(0, capacity, 0, math.ceil(tat - now), math.ceil(ahead - room), 0)
        end
        local remaining = math.floor((room - ahead) / t)
        local granted = take(lease, remaining)
        if granted > 1 then
            new_tat = new_tat + (granted - 1) * t
            ahead = new_tat - now
            remaining = remaining - (granted - 1)
        end
        store_tat(key, new_tat, math.ceil(ahead / 1000) + 1000)
        local delay = ahead - burst * t
        if delay < 0 or granted > 1 then
            delay = 0
        end
        return decision(1, capacity, remaining, math.ceil(ahead), 0, math.ceil(delay), granted)
    end

    local w = spec[2]
    local limit = spec[3]
    local window = math.floor(now / w)
    local elapsed = now - window * w
    local until_end = w - elapsed
    local stored = load_window(key)
    local stored_window = stored.w
    local c = stored.c
    local p = stored.p

    if algorithm == 2 then
        if stored_window ~= window then
            c = 0
        end
        if c >= limit then
            return decision(0, limit, 0, until_end, until_end, 0)
        end
        c = c + 1
        store_window(key, window, c, p, math.ceil(until_end / 1000) + 1000)
        return decision(1, limit, limit - c, until_end, 0, 0)
    end

    -- Sliding window, with weighted counters.
    if stored_window ~= window then
        if stored_window == window - 1 then
            p = c
        else
            p = 0
        end
        c = 0
    end
    local function reset(count)
        if count > 0 then
            return until_end + w
        elseif p > 0 then
            return until_end
        end
        return 0
    end
    local estimate = p * (w - elapsed) + c * w
    if estimate + w > limit * w then
        local retry = nil
        if c < limit and p > 0 then
            local needed = w - math.floor((limit - c - 1) * w / p)
            if needed < w then
                retry = needed - elapsed
            end
        end
        if not retry then
            local needed = 0
            if c > limit - 1 then
                needed = w - math.floor((limit - 1) * w / c)
            end
            retry = until_end + needed
        end
        if retry < 1 then
            retry = 1
        end
        return decision(0, limit, 0, reset(c), retry, 0)
    end
    c = c + 1
    store_window(key, window, c, p, math.ceil((until_end + w) / 1000) + 1000)
    return decision(1, limit, math.floor((limit * w - estimate - w) / w), reset(c), 0, 0)
end

-- The numbers of each distinct ARGV entry, parsed once per call.
local specs = {}
local function parse(text)
    local spec = specs[text]
    if not spec then
        spec = {}
        for number in string.gmatch(text, '%S+') do
            spec[#spec + 1] = tonumber(number)
        end
        specs[text] = spec
    end
    return spec
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local decisions = {}
local shared = #ARGV == 1 and ARGV[1]
if not shared and #ARGV ~= #KEYS then
    return redis.error_reply('ERR expected one ARGV entry or one per key, got ' .. #ARGV .. ' for ' .. #KEYS .. ' keys')
end
for i, key in ipairs(KEYS) do
    local ok, result = pcall(decide, key, parse(shared or ARGV[i]), now)
    if ok then
        decisions[i] = result
    else
        -- The error (a table with `err` on some Redis versions), without
        -- the separator of decisions.
        local message = type(result) == 'table' and result.err or tostring(result)
        decisions[i] = 'E ' .. string.gsub(message, ',', ';')
    end
end
write_back()
return table.concat(decisions, ',')
