-- One decision of one rate limit for one client key, atomically, on the
-- Redis server's clock. The same arithmetic as ratelimit/local.rs, in
-- microseconds.
--
-- KEYS[1]  the state of the limit for the client key
-- ARGV[1]  1: token or leaky bucket (GCRA), 2: fixed window, 3: sliding window,
--          4: give back the place of a queued request whose client went away
-- bucket:  ARGV[2] interval between requests (us), ARGV[3] burst, ARGV[4] queue
-- windows: ARGV[2] window (us), ARGV[3] limit
-- give back: ARGV[2] interval between requests (us)
--
-- Returns "allowed limit remaining reset_us retry_after_us delay_us" as one
-- string of integers (allowed is 0 or 1), which a client parses with less
-- work than an array of six integer replies; {} after a give back.

-- Needed before Redis 5 to write after reading TIME; a no-op since.
if redis.replicate_commands then
    pcall(redis.replicate_commands)
end

-- Formats a decision; %d truncates like Redis's conversion of a Lua number
-- to an integer reply.
local function decision(allowed, limit, remaining, reset, retry, delay)
    return string.format('%d %d %d %d %d %d', allowed, limit, remaining, reset, retry, delay)
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local key = KEYS[1]
local algorithm = tonumber(ARGV[1])

if algorithm == 4 then
    -- Moves the bucket's theoretical arrival time back by one interval, so
    -- the next request takes the place; never before now.
    local tat = tonumber(redis.call('GET', key))
    if tat then
        tat = tat - tonumber(ARGV[2])
        if tat <= now then
            redis.call('DEL', key)
        else
            redis.call('SET', key, string.format('%.17g', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
        end
    end
    return {}
end

if algorithm == 1 then
    local t = tonumber(ARGV[2])
    local burst = tonumber(ARGV[3])
    local queue = tonumber(ARGV[4])
    local capacity = burst + queue
    local tat = tonumber(redis.call('GET', key))
    if not tat or tat < now then
        tat = now
    end
    local new_tat = tat + t
    local ahead = new_tat - now
    local room = capacity * t
    if ahead > room then
        return decision(0, capacity, 0, math.ceil(tat - now), math.ceil(ahead - room), 0)
    end
    redis.call('SET', key, string.format('%.17g', new_tat), 'PX', math.ceil(ahead / 1000) + 1000)
    local delay = ahead - burst * t
    if delay < 0 then
        delay = 0
    end
    return decision(1, capacity, math.floor((room - ahead) / t), math.ceil(ahead), 0, math.ceil(delay))
end

local w = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local window = math.floor(now / w)
local elapsed = now - window * w
local until_end = w - elapsed
local stored = redis.call('HMGET', key, 'w', 'c', 'p')
local stored_window = tonumber(stored[1])
local c = tonumber(stored[2]) or 0
local p = tonumber(stored[3]) or 0

if algorithm == 2 then
    if stored_window ~= window then
        c = 0
    end
    if c >= limit then
        return decision(0, limit, 0, until_end, until_end, 0)
    end
    c = c + 1
    redis.call('HSET', key, 'w', window, 'c', c)
    redis.call('PEXPIRE', key, math.ceil(until_end / 1000) + 1000)
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
redis.call('HSET', key, 'w', window, 'c', c, 'p', p)
redis.call('PEXPIRE', key, math.ceil((until_end + w) / 1000) + 1000)
return decision(1, limit, math.floor((limit * w - estimate - w) / w), reset(c), 0, 0)
