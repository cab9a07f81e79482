// Auto-enrolment: an event subscription on the subscription's Event Grid system topic (created by
// events-topic.bicep, or the one the subscription already had) that hands each successful VM write
// to the enrol_vm_event function. That function only queues an enrolment job and returns, so
// Event Grid gets its answer at once and does not deliver again.
// Deploy it only after the code is published: Event Grid checks that the function exists.
param topicName string
param functionAppId string

@description('Name of the Event Grid trigger function in function_app.py.')
param functionName string = 'enrol_vm_event'

resource topic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: topicName
}

resource vmWrites 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: topic
  name: 'ezssh-vm-writes'
  properties: {
    destination: {
      endpointType: 'AzureFunction'
      properties: {
        resourceId: '${functionAppId}/functions/${functionName}'
        maxEventsPerBatch: 1
        preferredBatchSizeInKilobytes: 64
      }
    }
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: [
        'Microsoft.Resources.ResourceWriteSuccess'
      ]
      advancedFilters: [
        {
          operatorType: 'StringIn'
          key: 'data.operationName'
          values: [
            'Microsoft.Compute/virtualMachines/write'
          ]
        }
      ]
    }
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
  }
}

output subscriptionId string = vmWrites.id
