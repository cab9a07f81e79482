// ezssh in Azure: one resource group with the service, plus role assignments on the VMs it enrols.
//
//   az deployment sub create --location <region> --template-file infra/main.bicep \
//     --parameters @infra/main.parameters.json
//
// Subscription scope, so that one command creates the resource group and grants the service's
// managed identity its VM role on the resource groups (or subscriptions) named in vmScopes.
// Nothing here uses a secret: storage, Key Vault and Application Insights are all reached with the
// user-assigned managed identity. See docs/DEPLOY.md for the whole procedure.
//
// Not compiled here (no Bicep CLI was available where this was written); tests/deploy checks it
// structurally. Run `az bicep build --file infra/main.bicep` before the first deployment.
targetScope = 'subscription'

@description('Azure region for every resource (Flex Consumption must be offered there).')
param location string

@description('Name of the resource group to create or update.')
param resourceGroupName string = 'rg-ezssh'

@description('Short prefix for resource names: lower-case letters and digits.')
@minLength(3)
@maxLength(9)
param namePrefix string = 'ezssh'

@description('Tenant ids (GUIDs) whose users may sign in; the first is the one ezssh configure offers.')
@minLength(1)
param tenantIds array

@description('Client id of the API app registration (the audience of access tokens).')
param apiClientId string

@description('Application id URI of the API app registration, e.g. api://ezssh. Empty: api://<apiClientId>.')
param apiAppIdUri string = ''

@description('The delegated scope the CLI asks for.')
param apiScope string = 'access_as_user'

@description('Client id of the CLI public client app registration.')
param cliClientId string

@description('Token issuer with {tid}. Keep the Entra v2 default unless you know otherwise.')
param issuerTemplate string = 'https://login.microsoftonline.com/{tid}/v2.0'

@description('Table that holds policies, requests and audit.')
param tableName string = 'ezssh'

@description('Kind of new policy CA keys.')
@allowed([
  'EC-P256'
  'EC-P384'
  'RSA-3072'
])
param caKeyKind string = 'EC-P256'

@description('No policy may allow certificates longer than this many seconds.')
@minValue(60)
@maxValue(604800)
param maxTtlCeiling int = 86400

@description('Seconds certificates are backdated for clock skew.')
@minValue(0)
@maxValue(600)
param backdateSeconds int = 60

@description('URL of an existing Managed HSM (https://<name>.managedhsm.azure.net). Empty: create a Key Vault Premium.')
param managedHsmUrl string = ''

@description('Scopes whose VMs ezssh may enrol: resource group ids (/subscriptions/<sub>/resourceGroups/<rg>) or subscription ids (/subscriptions/<sub>).')
param vmScopes array = []

@description('Role the identity gets on vmScopes: a custom role limited to reading VMs and Run Command (assignable on vmScopes only), or the built-in Virtual Machine Contributor. Either is assigned on vmScopes only.')
@allowed([
  'VirtualMachineContributor'
  'RunCommandOnly'
])
param vmRole string = 'RunCommandOnly'

@description('Public base URL of the API if you front it with a custom domain. Empty: the app host name.')
param publicUrl string = ''

@description('Verified domains per tenant whose members {username} may stand for: <tenant id>=contoso.com,contoso.net;<tenant id>=... Empty: {username} expands for nobody.')
param verifiedDomains string = ''

@description('Host namespaces per tenant: the DNS suffixes, host names and IP ranges its hosts live in, <tenant id>=*.contoso.internal,10.20.0.0/16;<tenant id>=... Host certificates name only hosts inside them; tenant admins may change them through the API. Empty: no host certificates until a tenant admin declares them.')
param hostNamespaces string = ''

@description('Pending access requests one user may have open per policy.')
param maxPendingRequests int = 5

@description('Access requests one user may make per minute on one instance.')
param requestRate int = 30

@description('Seconds between leaver sweeps: identities holding live certificates are checked in Microsoft Graph and their certificates revoked when disabled or deleted (0: off). The identity needs the Graph application permissions User.Read.All and Application.Read.All (docs/DEPLOY.md).')
@minValue(0)
@maxValue(86400)
param leaverIntervalSeconds int = 300

@description('Also revoke users Entra ID Protection rates at this risk level or above (needs Entra ID P2 and IdentityRiskyUser.Read.All).')
@allowed(['none', 'low', 'medium', 'high'])
param leaverRiskLevel string = 'none'

@description('Subscribe the enrol_vm_event function to VM writes in this subscription. Needs the code published first (see docs/DEPLOY.md).')
param enableVmEvents bool = false

@description('Name of the Event Grid system topic this subscription already has (a source may have only one). Empty: create one in resourceGroupName.')
param existingVmEventsTopicName string = ''

@description('Resource group of existingVmEventsTopicName. Empty: resourceGroupName.')
param existingVmEventsTopicResourceGroup string = ''

@description('Changes the Key Vault name. A removed vault stays soft-deleted (purge protection) and keeps its name; to deploy again with a new vault, change this (e.g. 2), or recover the old vault instead (docs/DEPLOY.md).')
param keyVaultGeneration string = '1'

@description('Microsoft Graph root for groups overage. Empty: the Microsoft Graph service of this cloud (environment().graph is the retired Azure AD Graph, so it is not used).')
param graphEndpoint string = ''

@description('Upper bound of Flex Consumption instances.')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Memory per instance (MB).')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Tags for every resource.')
param tags object = {
  app: 'ezssh'
}

var suffix = uniqueString(subscription().id, resourceGroupName, namePrefix)
var useManagedHsm = !empty(managedHsmUrl)

// Microsoft Graph service roots by cloud (environment().name), from Microsoft Graph's "national cloud
// deployments" page. US Government L5 (DOD) uses https://dod-graph.microsoft.us: set graphEndpoint.
var microsoftGraphByCloud = {
  AzureCloud: 'https://graph.microsoft.com'
  AzureUSGovernment: 'https://graph.microsoft.us'
  AzureChinaCloud: 'https://microsoftgraph.chinacloudapi.cn'
}
// EZSSH_ENROL_SCOPES: the VMs in vmScopes belong to this subscription's tenant (the managed identity
// reaches ARM there only). With several tenants each scope must say whose policies may push to it.
var enrolScopes = (length(tenantIds) > 1) ? map(vmScopes, s => '${subscription().tenantId}=${s}') : vmScopes
var microsoftGraphEndpoint = empty(graphEndpoint) ? microsoftGraphByCloud[environment().name] : graphEndpoint

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: resourceGroupName
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  scope: rg
  name: 'ezssh-identity'
  params: {
    name: 'id-${namePrefix}-${suffix}'
    location: location
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  scope: rg
  name: 'ezssh-storage'
  params: {
    name: take('st${namePrefix}${suffix}', 24)
    location: location
    tags: tags
    tableName: tableName
  }
}

module monitoring 'modules/monitoring.bicep' = {
  scope: rg
  name: 'ezssh-monitoring'
  params: {
    namePrefix: namePrefix
    suffix: suffix
    location: location
    tags: tags
  }
}

module keyVault 'modules/keyvault.bicep' = if (!useManagedHsm) {
  scope: rg
  name: 'ezssh-keyvault'
  params: {
    name: 'kv-${namePrefix}-${take(uniqueString(subscription().id, resourceGroupName, namePrefix, keyVaultGeneration), 11)}'
    location: location
    tags: tags
  }
}

var keyvaultUrl = useManagedHsm ? managedHsmUrl : keyVault.outputs.vaultUri

module functionApp 'modules/functionapp.bicep' = {
  scope: rg
  name: 'ezssh-functionapp'
  params: {
    name: 'func-${namePrefix}-${suffix}'
    planName: 'plan-${namePrefix}-${suffix}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    deploymentContainerUrl: storage.outputs.deploymentContainerUrl
    tableEndpoint: storage.outputs.tableEndpoint
    queueEndpoint: storage.outputs.queueEndpoint
    blobEndpoint: storage.outputs.blobEndpoint
    appInsightsConnectionString: monitoring.outputs.connectionString
    tenantIds: tenantIds
    issuerTemplate: issuerTemplate
    apiClientId: apiClientId
    apiAppIdUri: apiAppIdUri
    apiScope: apiScope
    cliClientId: cliClientId
    tableName: tableName
    keyvaultUrl: keyvaultUrl
    caKeyKind: caKeyKind
    maxTtlCeiling: maxTtlCeiling
    backdateSeconds: backdateSeconds
    enrolScopes: enrolScopes
    publicUrl: publicUrl
    verifiedDomains: verifiedDomains
    hostNamespaces: hostNamespaces
    maxPendingRequests: maxPendingRequests
    requestRate: requestRate
    leaverIntervalSeconds: leaverIntervalSeconds
    leaverRiskLevel: leaverRiskLevel
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    graphEndpoint: microsoftGraphEndpoint
  }
  // The app starts (and its host reaches storage and the vault with the identity) only after the
  // identity holds its roles there and on the VMs.
  dependsOn: [
    rbac
    vmAccessResourceGroups
    vmAccessSubscriptions
  ]
}

// The service's own resources: storage (host + tables), the vault, telemetry.
module rbac 'modules/rbac.bicep' = {
  scope: rg
  name: 'ezssh-rbac'
  params: {
    principalId: identity.outputs.principalId
    storageAccountName: storage.outputs.name
    keyVaultName: useManagedHsm ? '' : keyVault.outputs.name
    appInsightsName: monitoring.outputs.appInsightsName
  }
}

// The VMs ezssh may enrol (Run Command pushes the host setup script).
var vmSubscriptionScopes = filter(vmScopes, s => length(split(s, '/')) == 3)
var vmResourceGroupScopes = filter(vmScopes, s => length(split(s, '/')) == 5)
// One custom role per subscription named in vmScopes, assignable exactly on the vmScopes in that
// subscription. Where vmScopes names only resource groups of a subscription, the role is deployed
// into the first of them: creating it needs rights on those resource groups only, none on the
// subscription or on anything vmScopes does not name.
// tests/hosts/test_vm_role.py runs every ARM call of the enrolment code against the ARM stand-in
// granting only these actions.
var runCommandActions = [
  'Microsoft.Compute/virtualMachines/read'
  'Microsoft.Compute/virtualMachines/instanceView/read'
  'Microsoft.Compute/virtualMachines/runCommand/action'
  'Microsoft.Compute/locations/operations/read'
  'Microsoft.Resources/subscriptions/resourceGroups/read'
  'Microsoft.Network/networkInterfaces/read' // host certificates: a VM's private IPs
  'Microsoft.Network/publicIPAddresses/read' // and its public IPs and DNS names
]
var useRunCommandRole = vmRole == 'RunCommandOnly'
var vmScopeSubscriptions = union(map(vmScopes, s => toLower(split(s, '/')[2])), [])
var roleSubscriptionsWhole = useRunCommandRole ? union(map(vmSubscriptionScopes, s => toLower(split(s, '/')[2])), []) : []
var roleSubscriptionsByGroup = useRunCommandRole ? filter(vmScopeSubscriptions, sub => !contains(roleSubscriptionsWhole, sub)) : []
var roleHomeGroups = map(roleSubscriptionsByGroup, sub => filter(vmResourceGroupScopes, s => toLower(split(s, '/')[2]) == sub)[0])

module runCommandRoles 'modules/vm-role.bicep' = [for sub in roleSubscriptionsWhole: {
  scope: subscription(sub)
  name: 'ezssh-vm-role-${uniqueString(sub, namePrefix)}'
  params: {
    namePrefix: namePrefix
    assignableScopes: filter(vmScopes, s => toLower(split(s, '/')[2]) == sub)
    actions: runCommandActions
  }
}]

module runCommandRolesInGroups 'modules/vm-role-rg.bicep' = [for home in roleHomeGroups: {
  scope: resourceGroup(split(home, '/')[2], split(home, '/')[4])
  name: 'ezssh-vm-role-${uniqueString(toLower(split(home, '/')[2]), namePrefix)}'
  params: {
    namePrefix: namePrefix
    assignableScopes: filter(vmScopes, s => toLower(split(s, '/')[2]) == toLower(split(home, '/')[2]))
    actions: runCommandActions
  }
}]

// Virtual Machine Contributor (built in).
var virtualMachineContributorRoleId = '9980e02c-c2be-4d73-94e8-173b1dc7cf3c'

module vmAccessResourceGroups 'modules/rbac-vm-rg.bicep' = [for s in vmResourceGroupScopes: {
  scope: resourceGroup(split(s, '/')[2], split(s, '/')[4])
  name: 'ezssh-vm-${uniqueString(s)}'
  params: {
    principalId: identity.outputs.principalId
    roleDefinitionGuid: useRunCommandRole ? guid('/subscriptions/${toLower(split(s, '/')[2])}', 'ezssh-vm-run-command', namePrefix) : virtualMachineContributorRoleId
  }
  dependsOn: [
    runCommandRoles
    runCommandRolesInGroups
  ]
}]

module vmAccessSubscriptions 'modules/rbac-vm-sub.bicep' = [for s in vmSubscriptionScopes: {
  scope: subscription(split(s, '/')[2])
  name: 'ezssh-vm-${uniqueString(s)}'
  params: {
    principalId: identity.outputs.principalId
    roleDefinitionGuid: useRunCommandRole ? guid('/subscriptions/${toLower(split(s, '/')[2])}', 'ezssh-vm-run-command', namePrefix) : virtualMachineContributorRoleId
  }
  dependsOn: [
    runCommandRoles
    runCommandRolesInGroups
  ]
}]

// Auto-enrolment: VM writes anywhere in this subscription reach the enrol_vm_event function.
// A source (this subscription) may have only one Event Grid system topic: reuse it when it exists.
var createVmEventsTopic = enableVmEvents && empty(existingVmEventsTopicName)
var vmEventsTopicName = empty(existingVmEventsTopicName) ? 'evgt-${namePrefix}-${suffix}' : existingVmEventsTopicName
var vmEventsTopicResourceGroup = empty(existingVmEventsTopicResourceGroup) ? resourceGroupName : existingVmEventsTopicResourceGroup

module eventsTopic 'modules/events-topic.bicep' = if (createVmEventsTopic) {
  scope: rg
  name: 'ezssh-events-topic'
  params: {
    topicName: vmEventsTopicName
    tags: tags
  }
}

module events 'modules/events.bicep' = if (enableVmEvents) {
  scope: resourceGroup(vmEventsTopicResourceGroup)
  name: 'ezssh-events'
  params: {
    topicName: vmEventsTopicName
    functionAppId: functionApp.outputs.id
  }
  dependsOn: [
    eventsTopic
  ]
}

@description('The service URL: hand `ezssh configure --server <apiUrl>` to users.')
output apiUrl string = 'https://${functionApp.outputs.defaultHostName}'

@description('The web page\'s sign-in redirect URI: add it to the CLI app registration as a single-page-application redirect URI (docs/DEPLOY.md, section 4).')
output webRedirectUri string = 'https://${functionApp.outputs.defaultHostName}/app/'

@description('The command users run once.')
output configureCommand string = 'ezssh configure --server https://${functionApp.outputs.defaultHostName}'

@description('What /api/client-config serves to `ezssh configure`, for checking.')
output clientConfig object = {
  authority: replace(replace(issuerTemplate, '{tid}', tenantIds[0]), '/v2.0', '')
  tenant_id: tenantIds[0]
  client_id: cliClientId
  scopes: [
    '${empty(apiAppIdUri) ? 'api://${apiClientId}' : apiAppIdUri}/${apiScope}'
  ]
}

output resourceGroupName string = rg.name
output functionAppName string = functionApp.outputs.name
output storageAccountName string = storage.outputs.name
output keyvaultUrl string = keyvaultUrl
output managedIdentityClientId string = identity.outputs.clientId
output managedIdentityPrincipalId string = identity.outputs.principalId
output managedIdentityName string = identity.outputs.name
output keyVaultName string = useManagedHsm ? '' : keyVault.outputs.name
