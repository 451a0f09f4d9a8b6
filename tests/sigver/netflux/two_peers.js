'use strict'
// Two Netflux 3.0.0 peers join one key through the signaling server given as the first
// argument, then each sends a message over the data channels they opened. Prints "OK" and exits
// 0 when both messages arrived; prints "FAIL <why>" and exits 1 otherwise.
// Netflux 3.0.0 assigns global.crypto, which Node 20 made a getter: let it assign
Object.defineProperty(globalThis, 'crypto', { value: globalThis.crypto, writable: true, configurable: true })
const { WebGroup, WebGroupState, setLogLevel, LogLevel } = require('netflux')

const [server, key, verbose] = process.argv.slice(2)
if (verbose) setLogLevel(LogLevel.SIGNALING, LogLevel.WEBRTC, LogLevel.CHANNEL)

// no STUN: the peers are on one machine, and nothing outside it is reachable
const options = { signalingServer: server, rtcConfiguration: { iceServers: [] }, autoRejoin: false }
const first = new WebGroup(options)
const second = new WebGroup(options)
const arrived = new Set()

function finish (code, text) {
  console.log(text)
  clearTimeout(timer)
  first.leave()
  second.leave()
  // wrtc keeps native threads alive after leave(): exit explicitly
  setTimeout(() => process.exit(code), 200)
}

const timer = setTimeout(() => finish(1, 'FAIL timed out; states ' +
  `${first.state}/${first.signalingState} ${second.state}/${second.signalingState}`), 30000)

function received (who, expected) {
  return (id, data) => {
    if (data !== expected) return finish(1, `FAIL ${who} received ${JSON.stringify(data)}`)
    arrived.add(who)
    if (arrived.size === 2) {
      if (!first.members.includes(second.myId) || !second.members.includes(first.myId)) {
        return finish(1, 'FAIL members do not list each other')
      }
      finish(0, 'OK')
    }
  }
}

first.onMessage = received('first', 'hello from second')
second.onMessage = received('second', 'hello from first')
first.onMemberJoin = () => first.send('hello from first')
second.onStateChange = (state) => {
  if (state === WebGroupState.JOINED) second.send('hello from second')
}
first.onStateChange = (state) => {
  if (state === WebGroupState.JOINED && second.state === WebGroupState.LEFT) second.join(key)
}
first.join(key)
