// Yours: `copier update` never overwrites or deletes this file.
const config = window.__APP_CONFIG__ ?? { apiBaseUrl: "/api", wsUrl: "/ws" };

function show(id, text) {
  document.getElementById(id).textContent = text;
}

fetch(`${config.apiBaseUrl}/health`)
  .then((response) => response.json())
  .then((body) => show("api-status", body.status))
  .catch((error) => show("api-status", `error: ${error}`));

const scheme = window.location.protocol === "https:" ? "wss" : "ws";
const socket = new WebSocket(`${scheme}://${window.location.host}${config.wsUrl}`);
socket.addEventListener("open", () => socket.send("ping"));
socket.addEventListener("message", (event) => {
  show("ws-status", `echo ${event.data}`);
  socket.close();
});
socket.addEventListener("error", () => show("ws-status", "error"));
